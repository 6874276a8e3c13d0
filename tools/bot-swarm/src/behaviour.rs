//! What each bot does: a behaviour drawn from a weighted mix with a seed,
//! turned into the waypoints it walks.

use glam::{DVec2, DVec3};
use serde::{Deserialize, Serialize};

/// A bot's behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Behaviour {
    /// Strolls between random points within 150 m of its spawn.
    Wander,
    /// Walks between two far points across the world, crossing many regions.
    Commute,
    /// Walks back and forth across a region boundary, past the hysteresis.
    Oscillate,
    /// Mills about a hotspot (drives a region split).
    Crowd,
    /// Strolls near its spawn and, every ten seconds or so, builds a brick
    /// ball in front of itself and digs its footing away: the world store
    /// takes the edits, and the ball's top breaks off as debris props.
    DigBuild,
    /// Looks for props near it, walks to one, crouches, grabs it, lifts it
    /// and throws it; makes debris itself (as `dig_build`) when none is near.
    GrabThrow,
    /// `grab_throw` astride a region boundary: its throws fly over it.
    ThrowOver,
    /// Follows the waypoints given on the command line.
    Path,
}

impl Behaviour {
    pub const MIXABLE: [Behaviour; 7] = [
        Behaviour::Wander,
        Behaviour::Commute,
        Behaviour::Oscillate,
        Behaviour::Crowd,
        Behaviour::DigBuild,
        Behaviour::GrabThrow,
        Behaviour::ThrowOver,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Behaviour::Wander => "wander",
            Behaviour::Commute => "commute",
            Behaviour::Oscillate => "oscillate",
            Behaviour::Crowd => "crowd",
            Behaviour::DigBuild => "dig_build",
            Behaviour::GrabThrow => "grab_throw",
            Behaviour::ThrowOver => "throw_over",
            Behaviour::Path => "path",
        }
    }
}

/// `wander=3,commute=1,…` → weights; unknown names and zero totals refused.
pub fn parse_mix(s: &str) -> Result<Vec<(Behaviour, u32)>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, w) = part.split_once('=').unwrap_or((part, "1"));
        let b = Behaviour::MIXABLE.into_iter().find(|b| b.name() == name.trim()).ok_or_else(|| {
            format!("unknown behaviour {name:?} (wander, commute, oscillate, crowd, dig_build, grab_throw, throw_over)")
        })?;
        let w: u32 = w.trim().parse().map_err(|_| format!("bad weight in {part:?}"))?;
        out.push((b, w));
    }
    if out.iter().map(|(_, w)| u64::from(*w)).sum::<u64>() == 0 {
        return Err("the behaviour mix has no weight".into());
    }
    Ok(out)
}

/// The horizontal extent of the world (from the coordinator's regions).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct World {
    pub min: DVec2,
    pub max: DVec2,
}

pub use shared::rng::Rng;

/// A point on a face between root cubes inside the world (the middle of
/// the world when it has none), and the axis the face is across (0: x, 1: z).
fn face(rng: &mut Rng, world: World, lo: DVec2, hi: DVec2) -> (usize, DVec2) {
    let faces = |min: f64, max: f64| -> Vec<f64> {
        (1..)
            .map(|k| (min / 2000.0).floor() * 2000.0 + 2000.0 * f64::from(k))
            .take_while(|v| *v < max)
            .filter(|v| *v > min)
            .collect()
    };
    let (xs, zs) = (faces(world.min.x, world.max.x), faces(world.min.y, world.max.y));
    let n = (xs.len() + zs.len()) as u64;
    if n == 0 {
        return (0, (world.min + world.max) / 2.0);
    }
    let k = (rng.next_u64() % n) as usize;
    if k < xs.len() {
        (0, DVec2::new(xs[k], rng.range(lo.y, hi.y)))
    } else {
        (1, DVec2::new(rng.range(lo.x, hi.x), zs[k - xs.len()]))
    }
}

/// Bot `i`'s behaviour and waypoints, the same for the same seed.
pub fn plan(mix: &[(Behaviour, u32)], seed: u64, i: u32, world: World, hotspot: DVec2) -> (Behaviour, Vec<DVec3>) {
    let mut rng = Rng::new(seed ^ u64::from(i).wrapping_mul(0xA24B_AED4_963E_E407));
    let total: u64 = mix.iter().map(|(_, w)| u64::from(*w)).sum();
    let mut pick = rng.next_u64() % total.max(1);
    let mut behaviour = mix.first().map_or(Behaviour::Wander, |m| m.0);
    for (b, w) in mix {
        if pick < u64::from(*w) {
            behaviour = *b;
            break;
        }
        pick -= u64::from(*w);
    }
    let margin = 60.0;
    let (lo, hi) = (world.min + margin, (world.max - margin).max(world.min + margin + 1.0));
    let clamp = |p: DVec2| p.clamp(lo, hi);
    let at = |p: DVec2| DVec3::new(p.x, 10.0, p.y);
    let points: Vec<DVec2> = match behaviour {
        Behaviour::Wander => {
            let home = DVec2::new(rng.range(lo.x, hi.x), rng.range(lo.y, hi.y));
            (0..6).map(|_| clamp(home + DVec2::new(rng.range(-150.0, 150.0), rng.range(-150.0, 150.0)))).collect()
        }
        Behaviour::Commute => {
            let z = rng.range(lo.y, hi.y);
            vec![DVec2::new(lo.x, z), DVec2::new(hi.x, z)]
        }
        Behaviour::Oscillate => {
            // 20 m either side of a face between root cubes (along x or z,
            // whichever the world has), past the hysteresis both ways.
            let (axis, p) = face(&mut rng, world, lo, hi);
            let (a, b) = if axis == 0 {
                (DVec2::new(p.x - 20.0, p.y), DVec2::new(p.x + 20.0, p.y))
            } else {
                (DVec2::new(p.x, p.y - 20.0), DVec2::new(p.x, p.y + 20.0))
            };
            vec![clamp(a), clamp(b)]
        }
        Behaviour::ThrowOver => {
            let (_, home) = face(&mut rng, world, lo, hi);
            (0..4).map(|_| clamp(home + DVec2::new(rng.range(-6.0, 6.0), rng.range(-6.0, 6.0)))).collect()
        }
        Behaviour::DigBuild | Behaviour::GrabThrow => {
            let home = DVec2::new(rng.range(lo.x, hi.x), rng.range(lo.y, hi.y));
            (0..4).map(|_| clamp(home + DVec2::new(rng.range(-25.0, 25.0), rng.range(-25.0, 25.0)))).collect()
        }
        Behaviour::Crowd => {
            (0..4).map(|_| clamp(hotspot + DVec2::new(rng.range(-15.0, 15.0), rng.range(-15.0, 15.0)))).collect()
        }
        Behaviour::Path => Vec::new(),
    };
    (behaviour, points.into_iter().map(at).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const WORLD: World = World { min: DVec2::new(0.0, 0.0), max: DVec2::new(4000.0, 2000.0) };

    #[test]
    fn a_seed_replays_the_plan_and_weights_are_honoured() {
        let mix = parse_mix("wander=3,commute=1,oscillate=0,crowd=1").unwrap();
        let hot = DVec2::new(1000.0, 1000.0);
        let a: Vec<_> = (0..200).map(|i| plan(&mix, 7, i, WORLD, hot)).collect();
        let b: Vec<_> = (0..200).map(|i| plan(&mix, 7, i, WORLD, hot)).collect();
        assert_eq!(a, b);
        let c: Vec<_> = (0..200).map(|i| plan(&mix, 8, i, WORLD, hot)).collect();
        assert_ne!(a, c, "another seed, another plan");
        let count = |k: Behaviour| a.iter().filter(|(b, _)| *b == k).count();
        assert_eq!(count(Behaviour::Oscillate), 0);
        assert!((90..150).contains(&count(Behaviour::Wander)), "{}", count(Behaviour::Wander));
        for (b, path) in &a {
            assert!(!path.is_empty());
            for p in path {
                assert!(p.x >= 60.0 && p.x <= 3940.0 && p.z >= 60.0 && p.z <= 1940.0, "{b:?} leaves the world: {p}");
            }
            if *b == Behaviour::Crowd {
                assert!(path.iter().all(|p| (p.x - 1000.0).abs() <= 15.0 && (p.z - 1000.0).abs() <= 15.0));
            }
            if *b == Behaviour::Commute {
                assert!((path[1].x - path[0].x).abs() > 3000.0, "crosses the world");
            }
        }
        let (_, osc) = plan(&parse_mix("oscillate").unwrap(), 1, 0, WORLD, hot);
        assert_eq!((osc[0].x, osc[1].x), (1980.0, 2020.0), "across the face at x = 2000");
        // In a 2 × 2 world, faces along both axes; throwers stand astride one.
        let square = World { min: DVec2::ZERO, max: DVec2::splat(4000.0) };
        let (mut across_x, mut across_z) = (0, 0);
        for i in 0..40 {
            let (_, o) = plan(&parse_mix("oscillate").unwrap(), 7, i, square, hot);
            if o[0].z == o[1].z && o[0].x == 1980.0 && o[1].x == 2020.0 {
                across_x += 1;
            } else if o[0].x == o[1].x && o[0].z == 1980.0 && o[1].z == 2020.0 {
                across_z += 1;
            }
            let (_, t) = plan(&parse_mix("throw_over").unwrap(), 7, i, square, hot);
            assert!(t.iter().all(|p| (p.x - 2000.0).abs() <= 6.0 || (p.z - 2000.0).abs() <= 6.0), "{t:?}");
        }
        assert!(across_x > 5 && across_z > 5 && across_x + across_z == 40, "{across_x} {across_z}");
    }

    #[test]
    fn bad_mixes_are_refused() {
        assert!(parse_mix("walk=1").is_err());
        assert!(parse_mix("wander=x").is_err());
        assert!(parse_mix("wander=0").is_err());
        assert!(parse_mix("wander").is_ok());
    }
}

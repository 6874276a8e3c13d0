//! What a `dig_build` or `grab_throw` bot does with its hands and tools,
//! tick by tick: a pure state machine fed with what the bot's authoritative
//! snapshots show, so it is tested without a server.
//!
//! Building: stand still, place a brick ball in front (touching the ground),
//! wait half a second, dig its footing away. The ball's top no longer
//! touches natural ground, so the server breaks it off into debris props.
//!
//! Throwing: walk to the nearest prop, crouch (the server refuses a hand
//! more than 1.3 m from the head, and a head that jumps more than 0.5 m a
//! frame), put the right hand on the prop, grip, lift, swing forward and
//! let go. A second later the bot looks whether the prop flew.

use glam::{DVec3, Quat, Vec3};
use serde::{Deserialize, Serialize};
use shared::EntityId;
use shared::edit::EditOp;
use shared::terrain::Material;
use shared::wire::{Pose, buttons};

/// Standing head, in tracking space (y up from the feet, -Z forward).
pub const HEAD: [f32; 3] = [0.0, 1.7, 0.0];
/// Crouching head, to reach the ground.
const CROUCH: [f32; 3] = [0.0, 1.0, -0.3];
/// Resting right hand.
pub const RIGHT: [f32; 3] = [0.25, 1.2, -0.3];
/// Where the hand lifts a prop to before the swing.
const LIFT: [f32; 3] = [0.0, 1.5, -0.4];
/// How far the hand may be from the head (the server allows 1.3 m).
const ARM_M: f32 = 1.2;
/// The head moves at most this much a tick (the server allows 0.5 m).
const HEAD_STEP_M: f32 = 0.05;
/// Ticks between two builds of one bot (10 s at 90 Hz).
pub const BUILD_EVERY: u32 = 900;
/// Props farther than this are not sought, metres.
const SEEK_M: f64 = 15.0;
/// Close enough to reach the prop, horizontally, metres.
const REACH_M: f64 = 0.7;
/// Ticks to reach for a prop before gripping (the hand settles on it).
const REACH_TICKS: u32 = 20;
const LIFT_TICKS: u32 = 40;
const SWING_TICKS: u32 = 8;
/// Hand travel a swing tick: 0.09 m at 90 Hz is about 8 m/s.
const SWING_STEP_M: f32 = 0.09;
/// Ticks after a release before the bot looks where the prop went.
const VERIFY_TICKS: u32 = 90;
/// A thrown prop that moved less than this did not fly, metres.
const FLEW_M: f64 = 1.0;
/// A prop not seen for this long is given up.
const LOST_TICKS: u32 = 90;

/// The kinds of work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trade {
    DigBuild,
    GrabThrow,
}

/// Counters of one bot's work, for its report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkStats {
    /// Edits sent, and how they ended.
    pub edits_sent: u32,
    pub edits_done: u32,
    pub edits_rejected: u32,
    /// Grips closed with the hand on a prop (the server may still miss it:
    /// its `props_grabbed_total` counts the grabs that held).
    pub grips: u32,
    /// Releases after a swing.
    pub throws: u32,
    /// Throws whose prop was seen a second later more than a metre away.
    pub props_flew: u32,
    /// Throws whose prop had not moved (the grip missed it).
    pub props_stayed: u32,
    /// Throws whose prop was out of view a second later.
    pub props_unseen: u32,
}

/// What the bot sees this tick (from its newest authoritative snapshot).
#[derive(Debug, Clone, Copy)]
pub struct Sight<'a> {
    pub pos: DVec3,
    /// Heading about +Y, radians (0 faces -Z).
    pub yaw: f32,
    /// Props in view: id and centre.
    pub props: &'a [(EntityId, DVec3)],
}

/// What the bot does this tick.
#[derive(Debug, Clone, PartialEq)]
pub struct Act {
    /// `Some`: walk there instead of along the waypoints. `Some(pos)`: stand.
    pub walk_to: Option<DVec3>,
    pub head: Pose,
    pub right: Pose,
    pub buttons: u32,
    pub edit: Option<EditOp>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Roam,
    /// Built at `since`; dig at `since + 45`.
    Building {
        since: u32,
        spot: DVec3,
    },
    Approach {
        prop: EntityId,
        seen: u32,
    },
    Reach {
        prop: EntityId,
        since: u32,
    },
    Lift {
        prop: EntityId,
        since: u32,
        from: [f32; 3],
    },
    Swing {
        prop: EntityId,
        since: u32,
    },
}

/// One bot's work.
#[derive(Debug, Clone)]
pub struct Work {
    trade: Trade,
    phase: Phase,
    next_build: u32,
    /// Not before this tick does a thrower look for the next prop.
    rest_until: u32,
    /// A thrown prop, where it was at the release, and when.
    thrown: Option<(EntityId, DVec3, u32)>,
    head: [f32; 3],
    pub stats: WorkStats,
}

fn local(yaw: f32, world: DVec3) -> Vec3 {
    Quat::from_rotation_y(-yaw) * world.as_vec3()
}

fn world(yaw: f32, local: Vec3) -> DVec3 {
    (Quat::from_rotation_y(yaw) * local).as_dvec3()
}

fn pose(p: [f32; 3]) -> Pose {
    Pose { pos: p, ..Default::default() }
}

/// What a VR player's head and hands do while its hands are free: it looks
/// around (the head turns ±35° and bobs), and gestures (each hand sways on
/// its own rhythm, now and then reaching out). `tick` is the input's
/// sequence, `phase` (0..1) sets the bot apart. Within the server's limits:
/// hands stay within reach of the head, the head moves mm a tick.
pub fn gesture(tick: u32, phase: f32) -> (Pose, Pose, Pose) {
    let t = tick as f32 / 90.0 + phase * 17.0;
    let tau = std::f32::consts::TAU;
    let yaw = 0.6 * (tau * 0.13 * t).sin();
    let pitch = 0.15 * (tau * 0.21 * t).sin();
    let head = Pose {
        pos: [0.03 * (tau * 0.3 * t).sin(), HEAD[1] + 0.02 * (tau * 0.5 * t).sin(), 0.0],
        rot: (Quat::from_rotation_y(yaw) * Quat::from_rotation_x(pitch)).to_array(),
    };
    let reach = 0.5 + 0.5 * (tau * 0.07 * t).sin().max(0.0);
    let left = Pose {
        pos: [-0.25 + 0.1 * (tau * 0.9 * t).sin(), 1.15 + 0.2 * (tau * 0.6 * t).sin(), -0.3 - 0.2 * reach],
        rot: Quat::from_rotation_z(0.4 * (tau * 0.9 * t).sin()).to_array(),
    };
    let right = Pose {
        pos: [0.25 + 0.1 * (tau * 0.7 * t).cos(), 1.15 + 0.25 * (tau * 0.8 * t).cos(), -0.3 - 0.1 * reach],
        rot: Quat::from_rotation_x(0.5 * (tau * 0.7 * t).cos()).to_array(),
    };
    (head, left, right)
}

impl Work {
    /// `first_build` staggers bots' builds (a tick in `0..BUILD_EVERY`).
    pub fn new(trade: Trade, first_build: u32) -> Self {
        Self {
            trade,
            phase: Phase::Roam,
            next_build: first_build,
            rest_until: 0,
            thrown: None,
            head: HEAD,
            stats: WorkStats::default(),
        }
    }

    /// An edit the bot sent was answered.
    pub fn edit_answered(&mut self, done: bool) {
        if done {
            self.stats.edits_done += 1;
        } else {
            self.stats.edits_rejected += 1;
        }
    }

    /// The bot lost its avatar (a reconnect): let go of what it was doing.
    pub fn reset(&mut self) {
        self.phase = Phase::Roam;
        self.thrown = None;
    }

    pub fn step(&mut self, tick: u32, me: Sight<'_>) -> Act {
        self.verify(tick, me);
        let mut act = Act { walk_to: None, head: pose(HEAD), right: pose(RIGHT), buttons: 0, edit: None };
        let mut head_goal = HEAD;
        match self.phase {
            Phase::Roam => {
                let nearest = me
                    .props
                    .iter()
                    .map(|(id, p)| (*id, *p, p.distance(me.pos)))
                    .filter(|(_, _, d)| *d <= SEEK_M)
                    .min_by(|a, b| a.2.total_cmp(&b.2));
                match (self.trade, nearest) {
                    (Trade::GrabThrow, Some((prop, p, _))) if tick >= self.rest_until => {
                        self.phase = Phase::Approach { prop, seen: tick };
                        act.walk_to = Some(p);
                    }
                    _ if tick >= self.next_build => {
                        // Build 2.5 m ahead, at the feet's height.
                        let spot = me.pos + world(me.yaw, Vec3::new(0.0, 0.0, -2.5));
                        act.edit = Some(EditOp::Place {
                            center: spot + DVec3::new(0.0, 1.2, 0.0),
                            radius: 1.2,
                            material: Material::Brick,
                        });
                        act.walk_to = Some(me.pos);
                        self.phase = Phase::Building { since: tick, spot };
                    }
                    _ => {}
                }
            }
            Phase::Building { since, spot } => {
                act.walk_to = Some(me.pos);
                if tick >= since + 45 {
                    act.edit = Some(EditOp::Dig { center: spot, radius: 1.6 });
                    self.next_build = tick + BUILD_EVERY;
                    self.phase = Phase::Roam;
                }
            }
            Phase::Approach { prop, seen } => match me.props.iter().find(|(id, _)| *id == prop) {
                Some((_, p)) => {
                    let d = DVec3::new(p.x - me.pos.x, 0.0, p.z - me.pos.z).length();
                    act.walk_to = Some(*p);
                    self.phase = if d <= REACH_M {
                        act.walk_to = Some(me.pos);
                        Phase::Reach { prop, since: tick }
                    } else {
                        Phase::Approach { prop, seen: tick }
                    };
                }
                None if tick > seen + LOST_TICKS => self.phase = Phase::Roam,
                None => act.walk_to = Some(me.pos),
            },
            Phase::Reach { prop, since } => {
                act.walk_to = Some(me.pos);
                head_goal = CROUCH;
                match me.props.iter().find(|(id, _)| *id == prop) {
                    Some((_, p)) => {
                        let hand = self.reachable(local(me.yaw, *p - me.pos));
                        act.right = pose(hand);
                        if tick >= since + REACH_TICKS && self.head == CROUCH {
                            act.buttons = buttons::GRIP_RIGHT;
                            self.stats.grips += 1;
                            self.phase = Phase::Lift { prop, since: tick, from: hand };
                        }
                    }
                    None => self.phase = Phase::Roam,
                }
            }
            Phase::Lift { prop, since, from } => {
                act.walk_to = Some(me.pos);
                act.buttons = buttons::GRIP_RIGHT;
                let t = ((tick - since) as f32 / LIFT_TICKS as f32).min(1.0);
                act.right = pose(self.reachable(Vec3::from(from).lerp(Vec3::from(LIFT), t)));
                if t >= 1.0 && self.head == HEAD {
                    self.phase = Phase::Swing { prop, since: tick };
                }
            }
            Phase::Swing { prop, since } => {
                act.walk_to = Some(me.pos);
                let i = tick - since;
                let mut hand = Vec3::from(LIFT);
                hand.z -= SWING_STEP_M * i.min(SWING_TICKS) as f32;
                act.right = pose(self.reachable(hand));
                if i < SWING_TICKS {
                    act.buttons = buttons::GRIP_RIGHT;
                } else {
                    self.stats.throws += 1;
                    let at = me.props.iter().find(|(id, _)| *id == prop).map_or(me.pos, |(_, p)| *p);
                    self.thrown = Some((prop, at, tick));
                    self.rest_until = tick + VERIFY_TICKS + 90;
                    self.phase = Phase::Roam;
                }
            }
        }
        // The head glides to where the phase wants it.
        let (h, g) = (Vec3::from(self.head), Vec3::from(head_goal));
        let d = g - h;
        self.head = if d.length() <= HEAD_STEP_M { head_goal } else { (h + d.normalize() * HEAD_STEP_M).into() };
        act.head = pose(self.head);
        act.right.pos = self.reachable(Vec3::from(act.right.pos));
        act
    }

    /// `hand`, pulled in to within the arm's length of the current head.
    fn reachable(&self, hand: Vec3) -> [f32; 3] {
        let head = Vec3::from(self.head);
        (head + (hand - head).clamp_length_max(ARM_M)).into()
    }

    fn verify(&mut self, tick: u32, me: Sight<'_>) {
        let Some((prop, at, when)) = self.thrown else { return };
        if tick < when + VERIFY_TICKS {
            return;
        }
        self.thrown = None;
        match me.props.iter().find(|(id, _)| *id == prop) {
            Some((_, p)) if p.distance(at) < FLEW_M => self.stats.props_stayed += 1,
            Some(_) => self.stats.props_flew += 1,
            None => self.stats.props_unseen += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOME: DVec3 = DVec3::new(100.0, 10.0, 100.0);

    #[test]
    fn gestures_stay_within_reach_move_every_tick_and_differ_between_bots() {
        let mut prev: Option<(Pose, Pose, Pose)> = None;
        for tick in 0..9000 {
            let (head, left, right) = gesture(tick, 0.37);
            let h = Vec3::from(head.pos);
            for hand in [&left, &right] {
                assert!(h.distance(Vec3::from(hand.pos)) <= ARM_M, "tick {tick}: out of reach");
            }
            for p in [&head, &left, &right] {
                assert!((Quat::from_array(p.rot).length() - 1.0).abs() < 1e-4, "unit rotations");
            }
            if let Some((ph, pl, _)) = prev {
                assert!(h.distance(Vec3::from(ph.pos)) <= HEAD_STEP_M, "tick {tick}: the head jumps");
                assert_ne!((ph.rot, pl.pos), (head.rot, left.pos), "tick {tick}: it moves every tick");
            }
            prev = Some((head, left, right));
        }
        assert_ne!(gesture(100, 0.1).1.pos, gesture(100, 0.6).1.pos);
    }

    fn run(work: &mut Work, from: u32, ticks: u32, pos: DVec3, props: &[(EntityId, DVec3)]) -> Vec<Act> {
        (from..from + ticks).map(|t| work.step(t, Sight { pos, yaw: 0.0, props })).collect()
    }

    fn within_limits(a: &Act) -> bool {
        let head = Vec3::from(a.head.pos);
        head.distance(Vec3::from(a.right.pos)) <= 1.3 && head.y <= 2.6
    }

    #[test]
    fn a_builder_places_then_digs_the_footing_every_ten_seconds() {
        let mut w = Work::new(Trade::DigBuild, 5);
        let acts = run(&mut w, 0, 2 * BUILD_EVERY, HOME, &[]);
        let edits: Vec<(usize, EditOp)> = acts.iter().enumerate().filter_map(|(t, a)| a.edit.map(|e| (t, e))).collect();
        assert_eq!(edits.len(), 4, "{edits:?}");
        let (t0, place) = edits[0];
        let (t1, dig) = edits[1];
        assert_eq!(t0, 5);
        assert_eq!(t1, 50);
        let EditOp::Place { center, radius, material: Material::Brick } = place else { panic!("{place:?}") };
        // In front (-Z), its bottom on the ground.
        assert!((center - DVec3::new(100.0, 11.2, 97.5)).length() < 1e-6 && radius == 1.2, "{center}");
        let EditOp::Dig { center: c, radius: r } = dig else { panic!("{dig:?}") };
        assert!((c - DVec3::new(100.0, 10.0, 97.5)).length() < 1e-6);
        // The dig removes the bottom of the ball, not its top: the top breaks off.
        assert!(r > 1.2 && (center.y + radius as f64) - c.y > r as f64);
        assert_eq!(edits[2].0, 50 + BUILD_EVERY as usize);
        // It stands while building and walks otherwise.
        assert_eq!(acts[10].walk_to, Some(HOME));
        assert_eq!(acts[60].walk_to, None);
        assert!(acts.iter().all(within_limits));
    }

    #[test]
    fn a_thrower_walks_to_a_prop_crouches_grabs_lifts_and_throws() {
        let mut w = Work::new(Trade::GrabThrow, 10_000);
        let prop = EntityId(1 << 40 | 7);
        let lying = DVec3::new(104.0, 10.45, 100.0);
        // Far from it: walk there.
        let a = run(&mut w, 0, 1, HOME, &[(prop, lying)]);
        assert_eq!(a[0].walk_to, Some(lying));
        // Arrived: it stands, crouches, reaches, then grips.
        let at = DVec3::new(103.6, 10.0, 100.0);
        let acts = run(&mut w, 1, 60, at, &[(prop, lying)]);
        let grip = acts.iter().position(|a| a.buttons == buttons::GRIP_RIGHT).expect("gripped");
        assert!(grip >= REACH_TICKS as usize, "waits for the hand to settle: {grip}");
        let hand = Vec3::from(acts[grip].right.pos);
        let want = Vec3::new(0.4, 0.45, 0.0);
        assert!(hand.distance(want) < 0.05, "the hand is on the prop: {hand} vs {want}");
        assert_eq!(w.stats.grips, 1);
        // Lift and swing with the grip held, then let go once.
        let acts = run(&mut w, 61, 90, at, &[(prop, lying)]);
        let release = acts.iter().position(|a| a.buttons == 0).expect("released");
        assert!(acts[..release].iter().all(|a| a.buttons == buttons::GRIP_RIGHT));
        assert_eq!(w.stats.throws, 1);
        // Swung forward (-Z), fast: the last swing ticks move 0.09 m each.
        let z: Vec<f32> = acts[release - 3..release].iter().map(|a| a.right.pos[2]).collect();
        assert!(z[1] < z[0] && z[2] < z[1] && (z[0] - z[1] - SWING_STEP_M).abs() < 1e-4, "{z:?}");
        assert!(acts.iter().all(within_limits));
        // A second later the prop is 6 m away: it flew; it rests before the next.
        let flown = DVec3::new(104.0, 10.45, 94.0);
        let acts = run(&mut w, 151, 120, at, &[(prop, flown)]);
        assert_eq!((w.stats.props_flew, w.stats.props_stayed), (1, 0));
        assert!(acts[..60].iter().all(|a| a.walk_to.is_none()), "rests after a throw");
    }

    #[test]
    fn the_head_never_jumps_and_a_lost_prop_is_given_up() {
        let mut w = Work::new(Trade::GrabThrow, 10_000);
        let prop = EntityId(1 << 40 | 9);
        let near = DVec3::new(100.3, 10.4, 100.0);
        let acts = run(&mut w, 0, 10, HOME, &[(prop, near)]);
        assert!(acts.iter().all(|a| a.buttons == 0), "still crouching");
        assert!(acts[9].head.pos[1] < 1.5, "crouches: {:?}", acts[9].head.pos);
        for pair in acts.windows(2) {
            assert!(Vec3::from(pair[0].head.pos).distance(Vec3::from(pair[1].head.pos)) <= 0.5);
        }
        // It vanishes mid-reach: back to roaming, and to building when it is time.
        let acts = run(&mut w, 10, 5, HOME, &[]);
        assert_eq!(acts[4].walk_to, None);
        let mut w = Work::new(Trade::GrabThrow, 0);
        let a = run(&mut w, 0, 1, HOME, &[]);
        assert!(matches!(a[0].edit, Some(EditOp::Place { .. })), "no prop near: it makes debris");
    }
}

//! The mesh's own components: the state it was born with, re-expressed as
//! components. Ids 1 to 999 are the mesh's; a game's start at
//! [`FIRST_GAME_ID`].

use super::{Audience, Component, ComponentError, ComponentId, Policy, Reader, Registry, RegistryError, put};
use crate::wire::Pose;

/// The first id a game may give its own components.
pub const FIRST_GAME_ID: ComponentId = 1000;

/// Adds the built-in components to `r`.
pub fn register(r: &mut Registry) -> Result<(), RegistryError> {
    r.register::<Transform>()?;
    r.register::<Kind>()?;
    r.register::<VrRig>()?;
    r.register::<PlayerName>()?;
    r.register::<PropBody>()?;
    r.register::<ResumedFromGhost>()?;
    Ok(())
}

/// Largest |position| in millimetres: 2^40 mm, about a million kilometres.
const MAX_POS_MM: i64 = 1 << 40;
/// Smallest-three bits of a transform's rotation (as snapshots use).
const TRANSFORM_ROT_BITS: u32 = 15;
/// Smallest-three bits of a tracked pose (as inputs use).
const POSE_ROT_BITS: u32 = 10;

/// Where an entity is: millimetres, a smallest-three rotation of 47 bits,
/// centimetres a second (as snapshots quantise them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Transform {
    pub pos_mm: [i64; 3],
    pub rot: u64,
    pub vel_cms: [i16; 3],
}

impl Component for Transform {
    const ID: ComponentId = 1;
    const NAME: &'static str = "transform";
    const VERSION: u16 = 1;
    // A mask, three varints of up to 10 bytes, the rotation (7), three of 3.
    const MAX_SIZE: usize = 1 + 30 + 7 + 9;
    const POLICY: Policy = Policy { audience: Audience::Everyone, ghosted: true, persisted: true };

    fn encode(&self, base: Option<&Self>, out: &mut Vec<u8>) {
        let b = base.copied().unwrap_or_default();
        let mask = u8::from(self.pos_mm != b.pos_mm)
            | u8::from(self.rot != b.rot) << 1
            | u8::from(self.vel_cms != b.vel_cms) << 2;
        out.push(mask);
        if mask & 1 != 0 {
            for i in 0..3 {
                put::signed(out, self.pos_mm[i].wrapping_sub(b.pos_mm[i]));
            }
        }
        if mask & 2 != 0 {
            put::varint(out, self.rot);
        }
        if mask & 4 != 0 {
            for i in 0..3 {
                put::signed(out, i64::from(self.vel_cms[i]) - i64::from(b.vel_cms[i]));
            }
        }
    }

    fn decode(r: &mut Reader<'_>, base: Option<&Self>) -> Result<Self, ComponentError> {
        let mut v = base.copied().unwrap_or_default();
        let mask = r.u8()?;
        if mask & !7 != 0 {
            return Err(ComponentError::OutOfRange("transform mask"));
        }
        if mask & 1 != 0 {
            for p in &mut v.pos_mm {
                *p = p.checked_add(r.signed()?).ok_or(ComponentError::OutOfRange("transform position"))?;
                if p.abs() > MAX_POS_MM {
                    return Err(ComponentError::OutOfRange("transform position"));
                }
            }
        }
        if mask & 2 != 0 {
            v.rot = r.varint()?;
            if v.rot >> (2 + 3 * TRANSFORM_ROT_BITS) != 0 {
                return Err(ComponentError::OutOfRange("transform rotation"));
            }
        }
        if mask & 4 != 0 {
            for c in &mut v.vel_cms {
                let sum = i64::from(*c) + r.signed()?;
                *c = i16::try_from(sum).map_err(|_| ComponentError::OutOfRange("transform velocity"))?;
            }
        }
        Ok(v)
    }
}

/// What an entity is, so a client knows what to draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Player,
    /// A box prop with these half extents, millimetres.
    PropBox {
        half_mm: [u16; 3],
    },
    /// A ball prop, its radius in millimetres.
    PropBall {
        radius_mm: u16,
    },
}

impl Component for Kind {
    const ID: ComponentId = 2;
    const NAME: &'static str = "kind";
    const VERSION: u16 = 1;
    const MAX_SIZE: usize = 7;
    const POLICY: Policy = Policy { audience: Audience::Everyone, ghosted: true, persisted: true };

    /// Always whole: a kind rarely changes.
    fn encode(&self, _base: Option<&Self>, out: &mut Vec<u8>) {
        match self {
            Kind::Player => out.push(0),
            Kind::PropBox { half_mm } => {
                out.push(1);
                for h in half_mm {
                    out.extend_from_slice(&h.to_le_bytes());
                }
            }
            Kind::PropBall { radius_mm } => {
                out.push(2);
                out.extend_from_slice(&radius_mm.to_le_bytes());
            }
        }
    }

    fn decode(r: &mut Reader<'_>, _base: Option<&Self>) -> Result<Self, ComponentError> {
        let positive = |v: u16| if v == 0 { Err(ComponentError::OutOfRange("prop size")) } else { Ok(v) };
        match r.u8()? {
            0 => Ok(Kind::Player),
            1 => Ok(Kind::PropBox { half_mm: [positive(r.u16()?)?, positive(r.u16()?)?, positive(r.u16()?)?] }),
            2 => Ok(Kind::PropBall { radius_mm: positive(r.u16()?)? }),
            _ => Err(ComponentError::OutOfRange("kind")),
        }
    }
}

/// A tracked pose relative to the body, quantised as inputs are:
/// millimetres and a 32-bit smallest-three rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RigPose {
    pub pos_mm: [i16; 3],
    pub rot: u32,
}

impl RigPose {
    pub fn quantise(p: &Pose) -> Self {
        let mm = |v: f32| {
            let q = (v / 0.001).round();
            if q.is_finite() { q.clamp(f32::from(i16::MIN), f32::from(i16::MAX)) as i16 } else { 0 }
        };
        Self {
            pos_mm: [mm(p.pos[0]), mm(p.pos[1]), mm(p.pos[2])],
            rot: crate::codec::smallest_three(p.rot, POSE_ROT_BITS) as u32,
        }
    }

    pub fn pose(&self) -> Pose {
        let m = |v: i16| f32::from(v) * 0.001;
        Pose {
            pos: [m(self.pos_mm[0]), m(self.pos_mm[1]), m(self.pos_mm[2])],
            rot: crate::codec::from_smallest_three(u64::from(self.rot), POSE_ROT_BITS),
        }
    }

    fn put(&self, out: &mut Vec<u8>) {
        for v in self.pos_mm {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.rot.to_le_bytes());
    }

    fn take(r: &mut Reader<'_>) -> Result<Self, ComponentError> {
        Ok(Self { pos_mm: [r.i16()?, r.i16()?, r.i16()?], rot: r.u32()? })
    }
}

/// A VR player's head and hands relative to its body, from the newest
/// input the server applied: what lets others see it look, wave and point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VrRig {
    pub head: RigPose,
    pub left: RigPose,
    pub right: RigPose,
}

impl VrRig {
    pub fn from_poses(head: &Pose, left: &Pose, right: &Pose) -> Self {
        Self { head: RigPose::quantise(head), left: RigPose::quantise(left), right: RigPose::quantise(right) }
    }

    fn poses(&self) -> [&RigPose; 3] {
        [&self.head, &self.left, &self.right]
    }
}

impl Component for VrRig {
    const ID: ComponentId = 3;
    const NAME: &'static str = "vr_rig";
    const VERSION: u16 = 1;
    const MAX_SIZE: usize = 1 + 3 * 10;
    const POLICY: Policy = Policy { audience: Audience::Everyone, ghosted: true, persisted: false };

    /// A mask of the poses that changed, then each of them whole.
    fn encode(&self, base: Option<&Self>, out: &mut Vec<u8>) {
        let b = base.copied().unwrap_or_default();
        let mask =
            self.poses().iter().zip(b.poses()).enumerate().fold(0u8, |m, (i, (a, b))| m | u8::from(*a != b) << i);
        out.push(mask);
        for (i, p) in self.poses().into_iter().enumerate() {
            if mask & (1 << i) != 0 {
                p.put(out);
            }
        }
    }

    fn decode(r: &mut Reader<'_>, base: Option<&Self>) -> Result<Self, ComponentError> {
        let mut v = base.copied().unwrap_or_default();
        let mask = r.u8()?;
        if mask & !7 != 0 {
            return Err(ComponentError::OutOfRange("rig mask"));
        }
        for (i, p) in [&mut v.head, &mut v.left, &mut v.right].into_iter().enumerate() {
            if mask & (1 << i) != 0 {
                *p = RigPose::take(r)?;
            }
        }
        Ok(v)
    }
}

/// Longest player name, bytes.
pub const MAX_PLAYER_NAME: usize = 32;

/// The name others see above a player; sent when it changes, not every tick.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PlayerName(pub String);

impl Component for PlayerName {
    const ID: ComponentId = 4;
    const NAME: &'static str = "player_name";
    const VERSION: u16 = 1;
    const MAX_SIZE: usize = 1 + MAX_PLAYER_NAME;
    const POLICY: Policy = Policy { audience: Audience::Everyone, ghosted: true, persisted: false };

    /// Always whole; a name longer than [`MAX_PLAYER_NAME`] bytes is cut
    /// at a character boundary.
    fn encode(&self, _base: Option<&Self>, out: &mut Vec<u8>) {
        let mut end = self.0.len().min(MAX_PLAYER_NAME);
        while !self.0.is_char_boundary(end) {
            end -= 1;
        }
        out.push(end as u8);
        out.extend_from_slice(&self.0.as_bytes()[..end]);
    }

    fn decode(r: &mut Reader<'_>, _base: Option<&Self>) -> Result<Self, ComponentError> {
        let n = usize::from(r.u8()?);
        if n > MAX_PLAYER_NAME {
            return Err(ComponentError::OutOfRange("player name length"));
        }
        let s = std::str::from_utf8(r.bytes(n)?).map_err(|_| ComponentError::OutOfRange("player name"))?;
        if s.chars().any(char::is_control) {
            return Err(ComponentError::OutOfRange("player name"));
        }
        Ok(Self(s.to_owned()))
    }
}

/// A prop's rigid-body extras that a client does not need: angular
/// velocity (milliradians a second) and whether it sleeps. Servers only:
/// handoffs and ghosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PropBody {
    pub angvel_mrads: [i16; 3],
    pub asleep: bool,
}

impl Component for PropBody {
    const ID: ComponentId = 5;
    const NAME: &'static str = "prop_body";
    const VERSION: u16 = 1;
    const MAX_SIZE: usize = 7;
    const POLICY: Policy = Policy { audience: Audience::Servers, ghosted: true, persisted: true };

    fn encode(&self, _base: Option<&Self>, out: &mut Vec<u8>) {
        for v in self.angvel_mrads {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.push(u8::from(self.asleep));
    }

    fn decode(r: &mut Reader<'_>, _base: Option<&Self>) -> Result<Self, ComponentError> {
        let angvel_mrads = [r.i16()?, r.i16()?, r.i16()?];
        let asleep = match r.u8()? {
            0 => false,
            1 => true,
            _ => return Err(ComponentError::OutOfRange("prop sleep flag")),
        };
        Ok(Self { angvel_mrads, asleep })
    }
}

/// Marks an entity resumed from its ghost (its server died handing it
/// over): it holds only the components neighbours mirror, so a save of its
/// player's progression keeps the stored components it lacks instead of
/// dropping them. Servers only; it moves with the entity in a handoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResumedFromGhost;

impl Component for ResumedFromGhost {
    const ID: ComponentId = 6;
    const NAME: &'static str = "resumed_from_ghost";
    const VERSION: u16 = 1;
    const MAX_SIZE: usize = 1;
    const POLICY: Policy = Policy { audience: Audience::Servers, ghosted: false, persisted: false };

    fn encode(&self, _base: Option<&Self>, out: &mut Vec<u8>) {
        out.push(1);
    }

    fn decode(r: &mut Reader<'_>, _base: Option<&Self>) -> Result<Self, ComponentError> {
        match r.u8()? {
            1 => Ok(Self),
            _ => Err(ComponentError::OutOfRange("resumed_from_ghost")),
        }
    }
}

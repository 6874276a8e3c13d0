//! The player protocol: what a game client and a game server say over QUIC.
//!
//! Two channels:
//! - unreliable datagrams, 90 a second each way: [`InputFrame`] up,
//!   [`Snapshot`] down. Hand-written little-endian codec: decoding an input
//!   never allocates, and every malformed datagram maps to a [`DecodeError`]
//!   whose [`DecodeError::reason`] is a stable metric label.
//! - one reliable bidirectional stream per connection, opened by the client,
//!   carrying length-prefixed [`ClientControl`] / [`ServerControl`] frames.
//!
//! Snapshots are encoded by [`crate::snapshot`] (quantised, delta against
//! the newest snapshot the client acknowledged); this module holds their
//! decoded form, [`Snapshot`].

use glam::DVec3;
use serde::{Deserialize, Serialize};

use crate::ids::{EntityId, PlayerId, ServerId};
use crate::time::Tick;

/// ALPN of the player protocol. A client offering anything else is refused
/// during the TLS handshake.
pub const ALPN: &[u8] = b"planetary-survival/1";
/// Version carried in the client's hello (2: quantised delta snapshots;
/// 3: pre-connect hints carry a standby ticket; 4: the hello carries the
/// client's component schema; 5: snapshot records carry components).
pub const PROTOCOL_VERSION: u16 = 5;
/// Largest datagram payload either side sends. QUIC guarantees only 1200-byte
/// UDP packets; its short header (up to a 20-byte connection id), packet
/// number, AEAD tag and DATAGRAM frame header leave about 1150 bytes, so 1100
/// fits on any path without relying on MTU discovery.
pub const MAX_DATAGRAM: usize = 1100;
/// Largest control frame, bytes.
pub const MAX_CONTROL_FRAME: usize = 64 * 1024;

const KIND_INPUT: u8 = 1;

/// Why a datagram or frame was refused. `reason()` names are metric labels:
/// never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("datagram is shorter than its kind requires")]
    Truncated,
    #[error("unknown datagram kind {0}")]
    UnknownKind(u8),
    #[error("datagram has {0} bytes after its end")]
    TrailingBytes(usize),
    #[error("a float is NaN or infinite")]
    NonFinite,
    #[error("more entities than a datagram can hold")]
    TooManyEntities,
    #[error("control frame is malformed")]
    BadFrame,
    #[error("control frame exceeds {MAX_CONTROL_FRAME} bytes")]
    FrameTooLarge,
    #[error("a variable-length integer is too long or out of range")]
    BadVarint,
    #[error("a delta snapshot names a baseline this side does not hold")]
    UnknownBaseline,
    #[error("a component was refused: {0}")]
    Component(crate::component::ComponentError),
}

impl DecodeError {
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Truncated => "truncated",
            DecodeError::UnknownKind(_) => "unknown_kind",
            DecodeError::TrailingBytes(_) => "trailing_bytes",
            DecodeError::NonFinite => "non_finite",
            DecodeError::TooManyEntities => "too_many_entities",
            DecodeError::BadFrame => "bad_frame",
            DecodeError::FrameTooLarge => "frame_too_large",
            DecodeError::BadVarint => "bad_varint",
            DecodeError::UnknownBaseline => "unknown_baseline",
            DecodeError::Component(e) => e.reason(),
        }
    }
}

/// A tracked pose, relative to the player's body (tracking space).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Pose {
    pub pos: [f32; 3],
    /// Unit quaternion, x y z w.
    pub rot: [f32; 4],
}

impl Default for Pose {
    fn default() -> Self {
        Self { pos: [0.0; 3], rot: [0.0, 0.0, 0.0, 1.0] }
    }
}

/// Bits of [`InputFrame::buttons`].
pub mod buttons {
    /// Left controller's grip: grab and hold with the left hand.
    pub const GRIP_LEFT: u32 = 1 << 0;
    /// Right controller's grip: grab and hold with the right hand.
    pub const GRIP_RIGHT: u32 = 1 << 1;
    pub const TRIGGER_LEFT: u32 = 1 << 2;
    pub const TRIGGER_RIGHT: u32 = 1 << 3;
    pub const JUMP: u32 = 1 << 4;
}

/// One frame of player input, sent every client tick.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct InputFrame {
    /// Increases by one every frame; the server applies each at most once, in order.
    pub seq: u32,
    /// Newest snapshot tick the client has received.
    pub ack_tick: Tick,
    pub head: Pose,
    pub left: Pose,
    pub right: Pose,
    /// Locomotion stick, each axis in [-1, 1]: x strafes (+east), y walks (+north, -Z).
    pub locomotion: [f32; 2],
    /// Snap/smooth turn, radians per second.
    pub turn: f32,
    pub buttons: u32,
}

/// One entity as a snapshot shows it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EntityState {
    pub id: EntityId,
    pub pos: DVec3,
    /// Orientation, unit quaternion x y z w (an avatar: its heading about +Y).
    pub rot: [f32; 4],
    pub vel: [f32; 3],
    /// The server authoritative for the entity, as the sender knows it.
    pub authority: ServerId,
}

/// The world as one server sees it at one tick, for one player.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub tick: Tick,
    pub server: ServerId,
    /// Whether the sending server is authoritative for the receiving player.
    pub authoritative: bool,
    /// Newest input frame of this player the server has applied (0: none).
    pub last_input_seq: u32,
    pub entities: Vec<EntityState>,
}

/// A datagram a server decodes. (Snapshots, the other kind, need the
/// client's baselines: [`crate::snapshot::Receiver`].)
#[derive(Debug, Clone, PartialEq)]
pub enum Datagram {
    Input(InputFrame),
}

/// Largest encoded input datagram: kind, seq, the acknowledged tick (a
/// varint), three poses (millimetres as `i16`, a 32-bit smallest-three
/// rotation), the stick, the turn rate and the buttons (a varint).
pub const MAX_INPUT_BYTES: usize = 1 + 4 + 10 + 3 * POSE_BYTES + 2 + 2 + 5;
const POSE_BYTES: usize = 3 * 2 + 4;
/// Turn rates travel in units of this, rad/s (±6.5 rad/s fits an `i16`).
const TURN_QUANTUM: f32 = 0.0002;
/// Pose positions travel in millimetres, rotations in 10 bits a component.
const ROT_BITS: u32 = 10;

/// `v` in units of `q`, clamped to the integer's range (NaN: 0).
fn quant<T: TryFrom<i64> + Copy>(v: f32, q: f32, lo: T, hi: T) -> T {
    let x = (v / q).round();
    if x.is_nan() {
        return T::try_from(0).unwrap_or(lo);
    }
    T::try_from(x as i64).unwrap_or(if x < 0.0 { lo } else { hi })
}

struct Writer<'a>(&'a mut Vec<u8>);

impl Writer<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i16(&mut self, v: i16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn varint(&mut self, v: u64) {
        crate::codec::put_varint(self.0, v);
    }
    fn pose(&mut self, p: &Pose) {
        for v in p.pos {
            self.i16(quant(v, 0.001, i16::MIN, i16::MAX));
        }
        self.u32(crate::codec::smallest_three(p.rot, ROT_BITS) as u32);
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let (head, rest) = self.0.split_first_chunk::<N>().ok_or(DecodeError::Truncated)?;
        self.0 = rest;
        Ok(*head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_le_bytes(self.take()?))
    }
    fn varint(&mut self) -> Result<u64, DecodeError> {
        crate::codec::take_varint(&mut self.0)
    }
    fn pose(&mut self) -> Result<Pose, DecodeError> {
        let mm = |v: i16| f32::from(v) * 0.001;
        Ok(Pose {
            pos: [mm(self.i16()?), mm(self.i16()?), mm(self.i16()?)],
            rot: crate::codec::from_smallest_three(u64::from(self.u32()?), ROT_BITS),
        })
    }
    fn finish(&self) -> Result<(), DecodeError> {
        if self.0.is_empty() { Ok(()) } else { Err(DecodeError::TrailingBytes(self.0.len())) }
    }
}

impl InputFrame {
    /// Appends the datagram encoding to `out` (at most [`MAX_INPUT_BYTES`]):
    /// poses in millimetres and 32-bit rotations, the stick in 1/127ths,
    /// the turn rate in 0.0002 rad/s. Decoding gives those quantised values.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = Writer(out);
        w.u8(KIND_INPUT);
        w.u32(self.seq);
        w.varint(self.ack_tick);
        w.pose(&self.head);
        w.pose(&self.left);
        w.pose(&self.right);
        for v in self.locomotion {
            w.u8(quant::<i8>(v.clamp(-1.0, 1.0), 1.0 / 127.0, -127, 127) as u8);
        }
        w.i16(quant(self.turn, TURN_QUANTUM, i16::MIN, i16::MAX));
        w.varint(u64::from(self.buttons));
    }

    fn decode_body(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let seq = r.u32()?;
        let ack_tick = r.varint()?;
        let (head, left, right) = (r.pose()?, r.pose()?, r.pose()?);
        let stick = |b: u8| f32::from((b as i8).max(-127)) / 127.0;
        let locomotion = [stick(r.u8()?), stick(r.u8()?)];
        let turn = f32::from(r.i16()?) * TURN_QUANTUM;
        let buttons = u32::try_from(r.varint()?).map_err(|_| DecodeError::BadVarint)?;
        Ok(Self { seq, ack_tick, head, left, right, locomotion, turn, buttons })
    }

    /// This frame as the server will see it (quantised as the wire carries it).
    pub fn quantised(&self) -> Self {
        let mut b = Vec::with_capacity(MAX_INPUT_BYTES);
        self.encode(&mut b);
        Datagram::decode_input(&b).expect("an encoded input decodes")
    }
}

impl Datagram {
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader(bytes);
        let d = match r.u8()? {
            KIND_INPUT => Datagram::Input(InputFrame::decode_body(&mut r)?),
            k => return Err(DecodeError::UnknownKind(k)),
        };
        r.finish()?;
        Ok(d)
    }

    /// Decodes an input datagram (what a server accepts from a client)
    /// without allocating.
    pub fn decode_input(bytes: &[u8]) -> Result<InputFrame, DecodeError> {
        let mut r = Reader(bytes);
        match r.u8()? {
            KIND_INPUT => {}
            k => return Err(DecodeError::UnknownKind(k)),
        }
        let f = InputFrame::decode_body(&mut r)?;
        r.finish()?;
        Ok(f)
    }
}

/// How a connection relates to the player's avatar on that server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinRole {
    /// Join the world here: the server spawns the avatar (or adopts it).
    Play,
    /// Pre-connect to a neighbour: the server buffers this player's inputs so
    /// that it can take the avatar over at a handoff without a handshake.
    Standby,
}

/// Client → server frames on the control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientControl {
    Hello {
        version: u16,
        /// The components the client knows
        /// ([`crate::component::Registry::schema`]): a server with another
        /// schema refuses the client (`schema_mismatch`) rather than send
        /// it what it would decode wrong.
        schema: crate::component::Schema,
        /// Login ticket (a development token for now).
        ticket: String,
        player: PlayerId,
        name: String,
        role: JoinRole,
        /// Where to spawn, for `Play` when the avatar is new.
        spawn: Option<DVec3>,
    },
    /// Change the world: dig or build. Answered by [`ServerControl::EditResult`]
    /// with the same `id`.
    Edit { id: u32, op: crate::edit::EditOp },
    /// The client is leaving; the server may drop its avatar.
    Bye,
    /// A chat line to every player of the mesh (at most
    /// [`MAX_CHAT_BYTES`]; longer lines and floods are dropped and counted).
    Chat { text: String },
}

/// The longest chat line a server relays, bytes.
pub const MAX_CHAT_BYTES: usize = 256;

/// Whether `text` may be relayed as a chat line or notice: 1 to
/// [`MAX_CHAT_BYTES`] bytes, not blank, no control characters.
pub fn is_relayable_text(text: &str) -> bool {
    !text.trim().is_empty() && text.len() <= MAX_CHAT_BYTES && !text.chars().any(char::is_control)
}

/// How an edit ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EditOutcome {
    /// Applied, and durable in the world store: it survives any restart.
    /// `changed` voxels changed (0 when the edit found nothing to change).
    Done { changed: u32 },
    /// Not applied; `reason` is a stable label (`out_of_reach`,
    /// `rate_limited`, `not_owner`, `not_loaded`, `bad_shape`,
    /// `store_busy`, `no_avatar`).
    Rejected { reason: String },
}

/// Server → client frames on the control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerControl {
    Welcome {
        server: ServerId,
        entity: EntityId,
        tick_hz: u32,
        /// Unix nanoseconds of tick 0 of the mesh grid.
        mesh_epoch_unix_nanos: u64,
        authoritative: bool,
        /// Seed of the procedural terrain: the client generates the world
        /// from it and receives only the edits on top.
        world_seed: u64,
    },
    /// Open a standby connection to this neighbour: the player is near its region.
    PreConnect {
        server: ServerId,
        quic_addr: String,
        /// SHA-256 of the neighbour's certificate (DER), for pinning.
        cert_sha256: String,
        /// A standby ticket for this neighbour, good once and for a short
        /// while (`None` when the coordinator could not be asked: the client
        /// buys one with its session, `POST /v1/tickets`).
        ticket: Option<String>,
    },
    /// Authority over the player's avatar moves to `to` from `effective_tick` on.
    AuthorityMoved { to: ServerId, effective_tick: Tick },
    /// This server is authoritative for the player from `effective_tick` on.
    AuthorityGained { effective_tick: Tick },
    /// The answer to [`ClientControl::Edit`] `id`.
    EditResult { id: u32, outcome: EditOutcome },
    /// The connection is refused; the connection is closed after this frame.
    Refused { reason: String },
    /// A chat line from a player anywhere in the mesh.
    Chat { from: PlayerId, name: String, text: String },
    /// A notice from the operators, to every player of the mesh.
    Notice { text: String },
    /// What players changed in one chunk near the player, on top of the
    /// world the client generates from `world_seed`: voxel index (as
    /// `ChunkLayout::local_index`) → material. `replace`: these are all of
    /// the chunk's changes at `version` (forget earlier ones); otherwise
    /// more of them (a chunk too big for one frame). Sent nearest first,
    /// again whenever the chunk changes.
    ChunkEdits {
        chunk: crate::chunk::ChunkKey,
        version: u64,
        replace: bool,
        voxels: Vec<(u32, crate::terrain::Material)>,
    },
}

/// Most voxels one [`ServerControl::ChunkEdits`] frame carries (well inside
/// [`MAX_CONTROL_FRAME`]: at most 3 bytes of index and 1 of material each).
pub const MAX_CHUNK_EDITS_PER_FRAME: usize = 12_000;

fn frame_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_CONTROL_FRAME>()
}

/// Encodes a control frame: a 4-byte little-endian length, then the body.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, DecodeError> {
    let body = bincode::serde::encode_to_vec(msg, frame_config()).map_err(|_| DecodeError::FrameTooLarge)?;
    if body.len() > MAX_CONTROL_FRAME {
        return Err(DecodeError::FrameTooLarge);
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Reads the length prefix of a control frame; refuses oversized frames
/// before anything is allocated for them.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, DecodeError> {
    let n = u32::from_le_bytes(prefix) as usize;
    if n > MAX_CONTROL_FRAME { Err(DecodeError::FrameTooLarge) } else { Ok(n) }
}

/// Decodes a control frame body (without its length prefix).
pub fn decode_frame<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, DecodeError> {
    let (msg, used) = bincode::serde::decode_from_slice(body, frame_config()).map_err(|_| DecodeError::BadFrame)?;
    if used != body.len() {
        return Err(DecodeError::TrailingBytes(body.len() - used));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pose() -> impl Strategy<Value = Pose> {
        (proptest::array::uniform3(-10.0f32..10.0), proptest::array::uniform4(-1.0f32..1.0))
            .prop_map(|(pos, rot)| Pose { pos, rot })
    }

    fn input() -> impl Strategy<Value = InputFrame> {
        (any::<u32>(), any::<u64>(), pose(), pose(), pose(), proptest::array::uniform2(-1.0f32..1.0), any::<u32>())
            .prop_map(|(seq, ack_tick, head, left, right, locomotion, buttons)| InputFrame {
                seq,
                ack_tick,
                head,
                left,
                right,
                locomotion,
                turn: 0.5,
                buttons,
            })
    }

    #[test]
    fn inputs_are_small() {
        let mut b = Vec::new();
        InputFrame::default().encode(&mut b);
        assert_eq!(b.len(), 41, "a frame at rest");
        let big = InputFrame { ack_tick: u64::MAX, buttons: u32::MAX, ..Default::default() };
        b.clear();
        big.encode(&mut b);
        assert_eq!(b.len(), MAX_INPUT_BYTES);
    }

    #[test]
    fn malformed_datagrams_have_stable_reasons() {
        assert_eq!(Datagram::decode(&[]).unwrap_err().reason(), "truncated");
        assert_eq!(Datagram::decode(&[9, 0]).unwrap_err().reason(), "unknown_kind");
        let mut b = Vec::new();
        InputFrame::default().encode(&mut b);
        b.push(0);
        assert_eq!(Datagram::decode(&b).unwrap_err().reason(), "trailing_bytes");
        // Not-a-number cannot travel: it goes as zero.
        let nan = InputFrame { locomotion: [f32::NAN, 0.0], turn: f32::INFINITY, ..Default::default() };
        let q = nan.quantised();
        assert_eq!(q.locomotion, [0.0, 0.0]);
        assert!((q.turn - f32::from(i16::MAX) * TURN_QUANTUM).abs() < 1e-6);
        let mut s = Vec::new();
        let h = crate::snapshot::Header { tick: 0, server: ServerId(1), authoritative: false, last_input_seq: 0 };
        crate::snapshot::encode(&h, DVec3::ZERO, &[], None, 200, &mut s);
        assert_eq!(Datagram::decode_input(&s).unwrap_err().reason(), "unknown_kind");
    }

    #[test]
    fn control_frames_round_trip_and_refuse_garbage() {
        let hello = ClientControl::Hello {
            version: PROTOCOL_VERSION,
            schema: crate::component::Registry::builtin().schema(),
            ticket: "dev".into(),
            player: PlayerId(42),
            name: "bot-42".into(),
            role: JoinRole::Play,
            spawn: Some(DVec3::new(1.0, 2.0, 3.0)),
        };
        let f = encode_frame(&hello).unwrap();
        let n = frame_len(f[..4].try_into().unwrap()).unwrap();
        assert_eq!(decode_frame::<ClientControl>(&f[4..4 + n]).unwrap(), hello);
        assert_eq!(decode_frame::<ClientControl>(&[0xff, 0xff, 0xff]).unwrap_err().reason(), "bad_frame");
        assert_eq!(frame_len(u32::MAX.to_le_bytes()).unwrap_err().reason(), "frame_too_large");
    }

    proptest! {
        #[test]
        fn input_round_trips_within_quantisation(f in input()) {
            let mut b = Vec::new();
            f.encode(&mut b);
            let d = Datagram::decode_input(&b).unwrap();
            prop_assert_eq!(Datagram::decode(&b).unwrap(), Datagram::Input(d));
            prop_assert_eq!((d.seq, d.ack_tick, d.buttons), (f.seq, f.ack_tick, f.buttons));
            for (a, b) in [(d.head, f.head), (d.left, f.left), (d.right, f.right)] {
                for k in 0..3 {
                    prop_assert!((a.pos[k] - b.pos[k]).abs() <= 0.0005 + 1e-6, "{:?} {:?}", a, b);
                }
                let (qa, qb) = (glam::Quat::from_array(a.rot), glam::Quat::from_array(b.rot));
                if qb.length() > 0.1 {
                    prop_assert!(qa.dot(qb.normalize()).abs() > 0.999, "{:?} {:?}", a.rot, b.rot);
                }
            }
            for k in 0..2 {
                prop_assert!((d.locomotion[k] - f.locomotion[k]).abs() <= 0.5 / 127.0 + 1e-6);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let _ = Datagram::decode(&bytes);
            let _ = Datagram::decode_input(&bytes);
            let _ = decode_frame::<ClientControl>(&bytes);
        }

        #[test]
        fn truncations_are_refused(f in input(), cut in 0usize..MAX_INPUT_BYTES) {
            let mut b = Vec::new();
            f.encode(&mut b);
            let cut = cut.min(b.len() - 1);
            prop_assert_eq!(Datagram::decode_input(&b[..cut]).unwrap_err(), DecodeError::Truncated);
        }
    }
}

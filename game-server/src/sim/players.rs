//! Players: joins and leaves, the directory's presence reports, progression,
//! input checks, and the bodies their inputs move.

use std::collections::{HashMap, VecDeque};

use bevy_ecs::prelude::*;
use glam::{DVec3, Vec2, Vec3, Vec4};
use shared::controller::{CharacterState, move_character};
use shared::wire::{InputFrame, JoinRole, Pose, ServerControl, buttons};
use shared::{EntityId, PlayerId};
use tracing::{info, warn};

use super::authority::{Authority, Transfer};
use super::core::*;
use super::messages::{Outbound, SimOut};
use super::physics::Hands;
use crate::sim::inbox::{Conn, Conns, Outbox};

/// Inputs kept per player beyond the newest applied: enough for a second of
/// client-side jitter and for a handoff to carry what was not applied yet.
pub const INPUT_BUFFER: usize = 128;

/// Inputs of players this server holds a standby connection for.
#[derive(Resource, Debug, Default)]
pub struct StandbyInputs(pub HashMap<PlayerId, VecDeque<InputFrame>>);

/// Inputs a standby connection keeps: enough to cover a source that dies
/// while handing the player over (2 s until the coordinator declares it
/// dead, a heartbeat to hear of it), so the target resumes with every input.
/// 360 frames: 4 s of a client's 90 inputs a second.
pub const STANDBY_INPUT_BUFFER: usize = 360;

/// Pushes `frame` into a sequence-ordered input buffer of at most `cap`
/// frames (the oldest go first); drops duplicates and frames at or below
/// `applied`. Returns whether it was kept.
pub fn buffer_input(buf: &mut VecDeque<InputFrame>, frame: InputFrame, applied: u32, cap: usize) -> bool {
    if frame.seq <= applied || buf.iter().any(|f| f.seq == frame.seq) {
        return false;
    }
    let at = buf.iter().position(|f| f.seq > frame.seq).unwrap_or(buf.len());
    buf.insert(at, frame);
    while buf.len() > cap {
        buf.pop_front();
    }
    true
}

/// Gives a player's entity its name, if it came without one.
fn named(world: &mut World, e: Entity, name: &str, tick: shared::Tick) {
    use shared::component::Component as _;
    use shared::component::builtin::PlayerName;
    if let Some(mut c) = world.get_mut::<Components>(e)
        && c.0.set().bytes(PlayerName::ID).is_none_or(|b| b == [0])
    {
        c.0.put(&PlayerName(name.chars().filter(|c| !c.is_control()).collect()), tick);
    }
}

/// Where a player joins when the client names no spawn point.
pub const DEFAULT_SPAWN: DVec3 = DVec3::new(1000.0, 10.0, 1000.0);

#[allow(clippy::too_many_arguments)]
pub(crate) fn joined(
    world: &mut World,
    conn: u64,
    player: PlayerId,
    name: String,
    role: JoinRole,
    spawn: Option<DVec3>,
    saved: Option<shared::component::ComponentSet>,
    tx: super::messages::ConnTx,
) {
    let cfg = world.resource::<SimConfig>().clone();
    let tick = world.resource::<TickState>().tick;
    let metrics = world.resource::<SimMetrics>().clone();
    let refuse = |reason: String| {
        metrics.0.connections_refused.with_label_values(&[reason.split(':').next().unwrap_or("refused")]).inc();
        let _ = tx.try_send(Outbound::Control(ServerControl::Refused { reason }));
    };
    let welcome = |authoritative: bool, entity: EntityId| ServerControl::Welcome {
        server: cfg.server,
        entity,
        tick_hz: cfg.clock.hz,
        mesh_epoch_unix_nanos: cfg.clock.epoch_unix_nanos,
        authoritative,
        world_seed: cfg.world_seed,
    };
    let entity_id = match EntityId::player(player) {
        Ok(id) => id,
        Err(e) => return refuse(format!("bad_player: {e}")),
    };
    let existing = world.resource::<Index>().by_player.get(&player).copied();
    match (role, existing) {
        (JoinRole::Play, Some(e)) => {
            if let Some(mut a) = world.get_mut::<Avatar>(e) {
                a.conn = Some(conn);
                // Handed over before any connection of the player was
                // here, the avatar came without its name.
                if a.name.is_empty() {
                    a.name = name.clone();
                }
            }
            named(world, e, &name, tick);
            let _ = tx.try_send(Outbound::Control(welcome(true, entity_id)));
            world.resource_mut::<Conns>().0.insert(conn, Conn { player, name: name.clone(), role, tx, acked: 0 });
        }
        (JoinRole::Play, None) => {
            let mut p = spawn.unwrap_or(DEFAULT_SPAWN);
            if !p.is_finite() {
                return refuse("bad_spawn: spawn point is not finite".to_owned());
            }
            // Stand on the generated ground (edits since are handled by the
            // controller: it lifts a body out of rock, and falls into pits).
            p.y = world.resource::<super::terrain::Terrain>().generator.ground_height(p.x, p.z) + 0.01;
            let map = world.resource::<Map>().0.clone();
            let Some(leaf) = map.tree.leaf_at(p) else {
                return refuse(format!("outside_world: spawn point {p} is outside the world"));
            };
            match map.live_owner(&leaf) {
                Some((owner, epoch)) if owner == cfg.server => {
                    let _ = tx.try_send(Outbound::Control(welcome(true, entity_id)));
                    world
                        .resource_mut::<Conns>()
                        .0
                        .insert(conn, Conn { player, name: name.clone(), role, tx, acked: 0 });
                    let mut comps = Components::player(&name, tick);
                    // Its saved components, those this build still persists.
                    for (id, bytes) in saved.iter().flat_map(|s| s.iter()) {
                        if cfg.registry.policy(id).is_some_and(|p| p.persisted) {
                            comps.0.put_bytes(id, bytes, tick);
                        }
                    }
                    let e = world
                        .spawn((
                            NetId(entity_id),
                            Body { pos: p, yaw: 0.0, vel: Vec3::ZERO },
                            comps,
                            Avatar { player, name, conn: Some(conn), ..Default::default() },
                            Authority::spawned(leaf, epoch, tick),
                            Hands::default(),
                        ))
                        .id();
                    let mut index = world.resource_mut::<Index>();
                    index.by_net.insert(entity_id, e);
                    index.by_player.insert(player, e);
                    info!(%player, %entity_id, region = %leaf, "player spawned");
                    presence(world, player, entity_id, true);
                }
                Some((owner, _)) => refuse(format!("not_owner: region {leaf} is owned by server {}", owner.0)),
                None => refuse(format!("not_owner: region {leaf} has no live owner yet")),
            }
        }
        (JoinRole::Standby, _) => {
            let _ = tx.try_send(Outbound::Control(welcome(existing.is_some(), entity_id)));
            world.resource_mut::<Conns>().0.insert(conn, Conn { player, name: name.clone(), role, tx, acked: 0 });
            if let Some(mut a) = existing.and_then(|e| world.get_mut::<Avatar>(e)) {
                a.conn.get_or_insert(conn);
                if a.name.is_empty() {
                    a.name = name.clone();
                }
            }
            if let Some(e) = existing {
                named(world, e, &name, tick);
            }
        }
    }
}

pub(crate) fn left(world: &mut World, conn: u64) {
    let Some(c) = world.resource_mut::<Conns>().0.remove(&conn) else { return };
    let still_connected = world.resource::<Conns>().0.values().any(|o| o.player == c.player);
    if !still_connected {
        world.resource_mut::<StandbyInputs>().0.remove(&c.player);
    }
    let Some(e) = world.resource::<Index>().by_player.get(&c.player).copied() else { return };
    let other = world.resource::<Conns>().0.iter().find(|(_, o)| o.player == c.player).map(|(id, _)| *id);
    if let Some(mut a) = world.get_mut::<Avatar>(e)
        && a.conn == Some(conn)
    {
        a.conn = other;
    }
    if !still_connected && world.get::<Transfer>(e).is_none_or(|t| !t.is_leaving()) {
        save_progress(world, e);
        super::checkpoints::gone(world, e);
        let entity = world.get::<NetId>(e).map(|n| n.0);
        despawn(world, e);
        info!(player = %c.player, "player left");
        if let Some(entity) = entity {
            presence(world, c.player, entity, false);
        }
    }
}

/// Tells the coordinator's directory; a full outbox drops it (counted).
pub(crate) fn presence(world: &World, player: PlayerId, entity: EntityId, online: bool) {
    let out = world.resource::<Outbox>();
    if out.0.try_send(SimOut::Presence { player, entity, online }).is_err() {
        world.resource::<SimMetrics>().0.transfers.with_label_values(&["presence_dropped"]).inc();
    }
}

/// The player's progression as it stands (position, its persisted
/// components; inventory and stats once the game has them), saved in the
/// background. The version is the mesh tick, which every server agrees
/// on, so a later save always wins.
pub fn progress_of(world: &World, e: Entity) -> Option<persistence::model::Progress> {
    let (avatar, body) = (world.get::<Avatar>(e)?, world.get::<Body>(e)?);
    let registry = &world.resource::<SimConfig>().registry;
    let components = world.get::<Components>(e).map(|c| c.0.set().filtered(registry, |p| p.persisted));
    Some(persistence::model::Progress {
        player: avatar.player,
        version: world.resource::<TickState>().tick,
        position: body.pos.to_array(),
        inventory: serde_json::json!([]),
        stats: serde_json::json!({}),
        components: components.filter(|c| !c.is_empty()).map(|c| c.to_bytes()).unwrap_or_default(),
    })
}

pub(crate) fn save_progress(world: &World, e: Entity) {
    if let Some(p) = progress_of(world, e) {
        world.resource::<Progression>().0.save_progress(p, keep_stored(world, e));
    }
}

/// The registry, when a save of `e`'s progression must keep the stored
/// components it lacks: it was resumed from its ghost, which mirrors only
/// some (`ResumedFromGhost`).
fn keep_stored(world: &World, e: Entity) -> Option<std::sync::Arc<shared::component::Registry>> {
    use shared::component::Component as _;
    use shared::component::builtin::ResumedFromGhost;
    let resumed = world.get::<Components>(e).is_some_and(|c| c.0.set().bytes(ResumedFromGhost::ID).is_some());
    resumed.then(|| world.resource::<SimConfig>().registry.clone())
}

/// At shutdown: saves every avatar's progression and waits (up to 5 s) for
/// the saves, so a clean stop or a rolling update keeps where players were.
pub fn save_all_progress(world: &mut World) {
    let avatars: Vec<Entity> = world.query_filtered::<Entity, With<Avatar>>().iter(world).collect();
    let store = world.resource::<Progression>().0.clone();
    let saves: Vec<_> = avatars
        .iter()
        .filter_map(|e| Some((progress_of(world, *e)?, keep_stored(world, *e))))
        .map(|(p, keep)| store.save_progress(p, keep))
        .collect();
    let n = saves.len();
    let done = store.rt.block_on(async {
        tokio::time::timeout(std::time::Duration::from_secs(5), futures::future::join_all(saves)).await
    });
    match done {
        Ok(results) => {
            let failed = results.iter().filter(|r| !matches!(r, Ok(Ok(())))).count();
            info!(players = n, failed, "progression saved at shutdown");
        }
        Err(_) => warn!(players = n, "progression saves did not finish within 5 s of shutdown"),
    }
}

/// Where player progression is saved.
#[derive(Debug, Resource, Clone)]
pub struct Progression(pub crate::store::WorldStore);

pub(crate) fn despawn(world: &mut World, e: Entity) {
    super::physics::release_physics(world, e);
    let net = world.get::<NetId>(e).map(|n| n.0);
    let player = world.get::<Avatar>(e).map(|a| a.player);
    world.despawn(e);
    let mut index = world.resource_mut::<Index>();
    if let Some(n) = net {
        index.by_net.remove(&n);
    }
    if let Some(p) = player {
        index.by_player.remove(&p);
    }
}

/// Limits on tracked poses, relative to the body (the play-space origin).
pub mod pose_limits {
    /// Farthest the head may be from the body's vertical axis, metres.
    pub const HEAD_HORIZONTAL_M: f32 = 2.5;
    /// Highest the head may be above the feet, metres.
    pub const HEAD_HEIGHT_M: f32 = 2.6;
    /// Farthest a hand may be from the head, metres.
    pub const ARM_M: f32 = 1.3;
    /// Farthest the head may move between two frames (45 m/s at 90 Hz).
    pub const HEAD_STEP_M: f32 = 0.5;
}

/// Why an input frame is refused: a stable metric label.
pub fn check_input(f: &InputFrame, prev_head: &Pose) -> Result<(), &'static str> {
    use pose_limits::*;
    let quat_ok = |r: &[f32; 4]| (0.8..1.2).contains(&Vec4::from(*r).length_squared());
    if !quat_ok(&f.head.rot) || !quat_ok(&f.left.rot) || !quat_ok(&f.right.rot) {
        return Err("bad_rotation");
    }
    let head = Vec3::from(f.head.pos);
    if Vec2::new(head.x, head.z).length() > HEAD_HORIZONTAL_M || !(-0.5..=HEAD_HEIGHT_M).contains(&head.y) {
        return Err("pose_far");
    }
    if head.distance(Vec3::from(f.left.pos)) > ARM_M || head.distance(Vec3::from(f.right.pos)) > ARM_M {
        return Err("pose_far");
    }
    if *prev_head != Pose::default() && head.distance(Vec3::from(prev_head.pos)) > HEAD_STEP_M {
        return Err("teleport");
    }
    Ok(())
}

/// Applies each player's pending inputs, in order and once, and moves the
/// body with the character controller against the terrain.
pub fn player_bodies(
    mut q: Query<(&mut Body, &mut Avatar, Option<&mut Components>), With<Authority>>,
    terrain: Res<super::terrain::Terrain>,
    cfg: Res<SimConfig>,
    tick: Res<TickState>,
    metrics: Res<SimMetrics>,
) {
    let mut applied = 0u64;
    for (mut body, mut a, comps) in &mut q {
        let steps = 1 + a.catch_up.min(90);
        a.catch_up = 0;
        let mut jump = false;
        a.applied_now = None;
        while let Some(f) = a.pending.pop_front() {
            a.last_applied = f.seq;
            a.applied_now = Some(match a.applied_now {
                Some((first, _, n)) => (first, f.seq, n + 1),
                None => (f.seq, f.seq, 1),
            });
            if let Err(reason) = check_input(&f, &a.head) {
                metrics.0.inputs_rejected.with_label_values(&[reason]).inc();
                continue;
            }
            let stick = Vec2::from(f.locomotion);
            a.locomotion = if stick.length_squared() > 1.0 { stick.normalize().into() } else { stick.into() };
            a.turn = f.turn.clamp(-std::f32::consts::TAU, std::f32::consts::TAU);
            a.head = f.head;
            a.left = f.left;
            a.right = f.right;
            jump |= f.buttons & buttons::JUMP != 0 && a.buttons & buttons::JUMP == 0;
            a.buttons = f.buttons;
            applied += 1;
        }
        // Others see the head and hands of the newest input applied.
        if a.applied_now.is_some() {
            let rig = shared::component::builtin::VrRig::from_poses(&a.head, &a.left, &a.right);
            if rig != a.rig {
                a.rig = rig;
                if let Some(mut c) = comps {
                    c.0.put(&rig, tick.tick);
                }
            }
        }
        let mut state = CharacterState { pos: body.pos, vel: body.vel, on_ground: a.on_ground };
        for _ in 0..steps {
            body.yaw = (body.yaw + a.turn * tick.dt).rem_euclid(std::f32::consts::TAU);
            // Yaw 0 faces -Z; the stick's x strafes right (+X at yaw 0).
            let (s, c) = body.yaw.sin_cos();
            let forward = Vec3::new(-s, 0.0, -c);
            let right = Vec3::new(c, 0.0, -s);
            let wish = (right * a.locomotion[0] + forward * a.locomotion[1]) * cfg.walk_speed;
            let out = move_character(&cfg.character, &mut state, wish, jump, tick.dt, &terrain.layout, &*terrain);
            jump = false;
            if out.stuck {
                metrics.0.bodies_stuck.inc();
            }
        }
        body.pos = state.pos;
        body.vel = state.vel;
        a.on_ground = state.on_ground;
    }
    metrics.0.inputs_applied.inc_by(applied);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(seq: u32) -> InputFrame {
        InputFrame { seq, ..Default::default() }
    }

    #[test]
    fn input_buffer_orders_dedups_and_bounds() {
        let mut b = VecDeque::new();
        assert!(buffer_input(&mut b, f(3), 0, INPUT_BUFFER));
        assert!(buffer_input(&mut b, f(1), 0, INPUT_BUFFER));
        assert!(!buffer_input(&mut b, f(3), 0, INPUT_BUFFER));
        assert!(!buffer_input(&mut b, f(5), 7, INPUT_BUFFER));
        assert!(buffer_input(&mut b, f(2), 0, INPUT_BUFFER));
        assert_eq!(b.iter().map(|f| f.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
        for s in 10..10 + INPUT_BUFFER as u32 {
            buffer_input(&mut b, f(s), 0, INPUT_BUFFER);
        }
        assert_eq!(b.len(), INPUT_BUFFER);
        assert_eq!(b.front().map(|f| f.seq), Some(10));
    }
}

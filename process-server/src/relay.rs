//! The process server's relay: agents in, master target out.
//!
//! For each agent connection (TLS, agent certificate required) the process server either
//! relays the conversation to the master target (TLS, master-target certificate required),
//! or, with a spool (`--cache`), holds it itself: every frame is stored before the agent is
//! acknowledged and forwarded live or later (see [`crate::spool`]). The plain relay passes
//! frames both ways with one frame in flight per direction, so a slow master target slows
//! the agents through TCP back-pressure instead of filling memory. Both check every frame's
//! length and that the conversation opens with `Hello`, and stamp the checkpoints of
//! consistency-group members.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use engine::block::geometry::SafeName;
use engine::error::{Error, Result};
use engine::wire::message::KIND_CHECKPOINT;
use engine::wire::throttle::Throttle;
use engine::wire::tls::{Identity, Role};
use engine::wire::transport::{self, Conn, ConnReader, ConnWriter, Limits};
use engine::wire::{handshake, Frame, Message};

use crate::master_target::{ClientTls, MasterTarget};
use crate::spool::conversation::hold;
use crate::spool::replay::replay_machine;
use crate::spool::{disk_work, Spool};

/// Where the relay forwards to.
#[derive(Debug, Clone, Default)]
pub struct ProcessServerConfig {
    /// The master target's address, `HOST:PORT`.
    pub master_target: String,
    /// Consistency groups: group name -> member machines.
    pub groups: Vec<(SafeName, Vec<SafeName>)>,
    /// Bandwidth limit towards the master target, shared by every agent's stream.
    pub throttle: Option<Arc<Throttle>>,
    /// Where conversations go while the master target is away.
    pub spool: Option<Arc<Spool>>,
    /// Bounds on agent connections.
    pub limits: Limits,
}

impl ProcessServerConfig {
    /// The group `machine` belongs to, if any.
    fn group_of(&self, machine: &str) -> Option<&(SafeName, Vec<SafeName>)> {
        self.groups
            .iter()
            .find(|(_, members)| members.iter().any(|m| m.as_str() == machine))
    }

    /// Stamps a member machine's `Checkpoint` with its group, so the master target makes a
    /// group point once every member's point is durable. Other frames pass untouched.
    fn stamp(&self, machine: &str, frame: Frame) -> Result<Frame> {
        if frame.kind != KIND_CHECKPOINT {
            return Ok(frame);
        }
        let Message::Checkpoint { kind, label, .. } = Message::from_frame(frame)? else {
            return Err(Error::Protocol("malformed Checkpoint".into()));
        };
        let (group, members) = match self.group_of(machine) {
            Some((group, members)) => (
                group.to_string(),
                members.iter().map(ToString::to_string).collect(),
            ),
            None => (String::new(), Vec::new()),
        };
        Ok(Message::Checkpoint {
            kind,
            label,
            group,
            members,
        }
        .to_frame())
    }
}

/// Serves agents on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    identity: &Identity,
    config: ProcessServerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let master_target_tls = ClientTls::new(identity)?;
    if let Some(spool) = &config.spool {
        for machine in spool.machines() {
            if spool.has_backlog(&machine) {
                tracing::info!(%machine, "forwarding what the spool held at start");
                tokio::spawn(replay_machine(
                    spool.clone(),
                    machine,
                    MasterTarget {
                        address: config.master_target.clone(),
                        tls: master_target_tls.clone(),
                        throttle: config.throttle.clone(),
                    },
                ));
            }
        }
        let spool = spool.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = disk_work(|| spool.write_status()) {
                    tracing::warn!(error = %e.chain(), "cannot write the spool status");
                }
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            }
        });
    }
    let config = Arc::new(config);
    let limits = config.limits;
    transport::serve(
        listener,
        identity,
        &[Role::Agent],
        limits,
        shutdown,
        move |agent| {
            let config = config.clone();
            let master_target_tls = master_target_tls.clone();
            async move { relay(agent, &config, master_target_tls).await }
        },
    )
    .await
}

/// Relays or holds one agent's conversation; returns the machine name.
async fn relay(
    mut agent: Conn,
    config: &ProcessServerConfig,
    master_target_tls: ClientTls,
) -> Result<String> {
    let machine = match handshake::read_hello(&mut agent, "process server").await {
        Ok(hello) => hello.machine,
        Err(err) => {
            agent.fail(&err).await;
            return Err(err);
        }
    };
    let target = MasterTarget {
        address: config.master_target.clone(),
        tls: master_target_tls,
        throttle: config.throttle.clone(),
    };
    if let Some(spool) = &config.spool {
        return hold_conversation(agent, config, spool, target, machine).await;
    }
    let opened = async {
        let conn = target.introduce(&machine).await?;
        handshake::welcome(&mut agent).await?;
        Ok::<_, Error>(conn)
    };
    let master_target = match opened.await {
        Ok(master_target) => master_target,
        Err(err) => {
            agent.fail(&err).await;
            return Err(err);
        }
    };
    tracing::info!(%machine, "relaying");
    let (agent_rx, mut agent_tx) = agent.split();
    let (master_target_rx, mut master_target_tx) = master_target.split();
    master_target_tx.set_throttle(config.throttle.clone());
    let stamp = |frame: Frame| config.stamp(machine.as_str(), frame);
    let outcome = pump_both(
        agent_rx,
        &mut agent_tx,
        master_target_rx,
        &mut master_target_tx,
        stamp,
    )
    .await;
    match outcome {
        Ok(()) => Ok(machine.to_string()),
        Err(Failure::Agent(err)) => {
            // The agent broke the protocol: tell it why; the master target sees the cut.
            let _ = agent_tx.send(&Message::error(&err)).await;
            let _ = agent_tx.close().await;
            Err(err)
        }
        Err(Failure::MasterTarget(err)) => {
            let err =
                Error::Unavailable(format!("master target connection failed: {}", err.chain()));
            let _ = agent_tx.send(&Message::error(&err)).await;
            let _ = agent_tx.close().await;
            Err(err)
        }
    }
}

/// Holds a conversation with the spool: live while the master target is reachable and the
/// machine has nothing waiting (so nothing overtakes what waits), spooled otherwise.
async fn hold_conversation(
    mut agent: Conn,
    config: &ProcessServerConfig,
    spool: &Arc<Spool>,
    target: MasterTarget,
    machine: SafeName,
) -> Result<String> {
    let master_target = if spool.has_backlog(&machine) {
        tracing::info!(%machine, "earlier conversations are still in the spool: spooling this one behind them");
        None
    } else {
        match target.open(&machine).await {
            Ok(master_target) => Some(master_target),
            Err(why) => {
                tracing::warn!(%machine, reason = %why.chain(), "spooling this conversation");
                None
            }
        }
    };
    let live = master_target.is_some();
    handshake::welcome(&mut agent).await?;
    tracing::info!(%machine, live, "holding the conversation");
    let stamp = |frame| config.stamp(machine.as_str(), frame);
    let held = hold(&mut agent, &machine, spool, &target, master_target, stamp).await;
    let _ = disk_work(|| spool.write_status());
    if spool.has_backlog(&machine) {
        tokio::spawn(replay_machine(spool.clone(), machine.clone(), target));
    }
    match held {
        Ok(()) => {
            agent.close().await;
            Ok(machine.to_string())
        }
        Err(err) => {
            agent.fail(&err).await;
            Err(err)
        }
    }
}

enum Failure {
    Agent(Error),
    MasterTarget(Error),
}

/// Passes frames both ways until both directions have ended.
async fn pump_both(
    mut agent_rx: ConnReader,
    agent_tx: &mut ConnWriter,
    mut master_target_rx: ConnReader,
    master_target_tx: &mut ConnWriter,
    stamp: impl Fn(Frame) -> Result<Frame>,
) -> Result<(), Failure> {
    let up = async {
        while let Some(frame) = agent_rx.recv_frame().await.map_err(Failure::Agent)? {
            let frame = stamp(frame).map_err(Failure::Agent)?;
            master_target_tx
                .send_frame(frame)
                .await
                .map_err(Failure::MasterTarget)?;
        }
        let _ = master_target_tx.close().await;
        Ok(())
    };
    let down = async {
        while let Some(frame) = master_target_rx
            .recv_frame()
            .await
            .map_err(Failure::MasterTarget)?
        {
            agent_tx.send_frame(frame).await.map_err(Failure::Agent)?;
        }
        let _ = agent_tx.close().await;
        Ok(())
    };
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            r = &mut up, if !up_done => { r?; up_done = true; }
            r = &mut down, if !down_done => { r?; down_done = true; }
        }
    }
    Ok(())
}

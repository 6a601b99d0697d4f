//! Pausing sessions to disk and resuming them: on request, when idle, at shutdown; and
//! finding them again when the server starts. A paused session has no VM: its state is in
//! the paused store (`forkvm_template::paused`), and any request to it resumes it first.

use std::sync::Arc;
use std::time::{Duration, Instant};

use forkvm_template::paused::PausedError;
use forkvm_worker::RemoteSession as Session;

use crate::api::worker_error;
use crate::error::ApiError;
use crate::sessions::{Held, SessionEntry};
use crate::{AppState, PauseConfig};

/// Pauses running at once when idle sessions are paused (each mostly waits for the disk).
const PAUSES_AT_ONCE: usize = 2;

fn config(state: &AppState) -> Result<&PauseConfig, ApiError> {
    state.config.paused.as_ref().ok_or_else(|| {
        ApiError::conflict(
            "pausing_disabled",
            "this server stores no paused sessions (it was started without a paused-session store)",
        )
    })
}

/// Pauses `entry`'s session: its state stored on disk (replacing any earlier pause), then
/// its VM freed. Already paused: nothing to do. If storing fails, the session runs on.
pub async fn pause(state: &Arc<AppState>, entry: &Arc<SessionEntry>) -> Result<(), ApiError> {
    store(state, entry, true).await
}

/// Checkpoints `entry`'s running session: its state stored on disk as a pause would, while
/// it runs on. After a crash the next server serves it from there.
pub async fn checkpoint(state: &Arc<AppState>, entry: &Arc<SessionEntry>) -> Result<(), ApiError> {
    store(state, entry, false).await
}

/// Stores the running session's state, then (`free`) frees its VM and marks it paused, or
/// leaves it running with its checkpoint noted.
async fn store(
    state: &Arc<AppState>,
    entry: &Arc<SessionEntry>,
    free: bool,
) -> Result<(), ApiError> {
    let config = config(state)?.clone();
    let mut guard = entry.session.lock().await;
    let mut session = match guard.take() {
        None => return Err(ApiError::not_found("the sandbox was deleted")),
        Some(Held::Paused) => {
            *guard = Some(Held::Paused);
            return Ok(());
        }
        Some(Held::Running(session)) => session,
    };
    let digest = match state.templates.choose(Some(&entry.template), "") {
        Ok(served) => served.digest.clone(),
        Err(e) => {
            *guard = Some(Held::Running(session));
            return Err(e);
        }
    };
    let record = entry.record();
    // What its own earlier pause or checkpoint holds is replaced, so it does not count.
    let stored_elsewhere = state.sessions.stored_bytes_of(&entry.owner) - entry.stored_bytes();
    let checkpointed = Instant::now();
    let joined = tokio::task::spawn_blocking(move || {
        let stored = store_pause(
            &config,
            &mut session,
            &record,
            &digest,
            stored_elsewhere,
            free,
        );
        (session, stored)
    })
    .await;
    let (session, stored) =
        joined.map_err(|e| ApiError::internal(format!("pause thread failed: {e}")))?;
    let bytes = match stored {
        Ok(bytes) => bytes,
        Err(e) => {
            *guard = Some(Held::Running(session));
            return Err(e);
        }
    };
    if !free {
        *guard = Some(Held::Running(session));
        entry.set_checkpointed(bytes, checkpointed);
        state.metrics.sessions_checkpointed.inc();
        return Ok(());
    }
    // Stored: the VM goes (its worker tears it down off this path).
    tokio::task::spawn_blocking(move || drop(session));
    *guard = Some(Held::Paused);
    entry.set_paused(bytes);
    state.fairness.release(&entry.owner, 1);
    state.metrics.sessions_paused.inc();
    state
        .metrics
        .sessions_paused_now
        .set(state.sessions.paused_count() as i64);
    tracing::info!(session = %entry.id, bytes, "session paused");
    Ok(())
}

/// Checkpoints every running session used since its last checkpoint, one at a time.
pub async fn checkpoint_used(state: &Arc<AppState>) {
    for entry in state.sessions.used_since_checkpoint() {
        if let Err(e) = checkpoint(state, &entry).await {
            tracing::warn!(session = %entry.id, error = %e.message, "session not checkpointed");
        }
    }
}

/// Captures the session's state from its worker and writes it to the store, within the
/// owner's storage quota. Returns the bytes stored.
fn store_pause(
    config: &PauseConfig,
    session: &mut Session,
    record: &forkvm_template::paused::SessionRecord,
    template_digest: &str,
    stored_elsewhere: u64,
    free: bool,
) -> Result<u64, ApiError> {
    let (paused, files) = session.pause().map_err(|e| worker_error(e, "session"))?;
    let needed: u64 =
        paused.memories.iter().map(|m| m.bytes()).sum::<u64>() + paused.state.len() as u64;
    if let Some(limit) = config.key_storage_bytes
        && stored_elsewhere + needed > limit
    {
        return Err(ApiError::quota(format!(
            "pausing needs up to {} MiB of storage; this key's paused sessions hold {} MiB of its {} MiB: delete paused sessions to make room",
            needed >> 20,
            stored_elsewhere >> 20,
            limit >> 20
        )));
    }
    let manifest = config
        .store
        .write(record, template_digest, config.cpu.clone(), &paused, &files)
        .map_err(|e| ApiError::internal(format!("storing the paused session: {e}")))?;
    if free {
        config.store.unmark_running(&record.id);
    }
    Ok(manifest.stored_bytes)
}

/// Brings a paused session back into a worker of its template. Its stored state is
/// deleted once it runs (from then on it is a running session: a crash loses it).
pub async fn resume(state: &Arc<AppState>, entry: &SessionEntry) -> Result<Session, ApiError> {
    let config = config(state)?.clone();
    let served = state.templates.choose(Some(&entry.template), "")?;
    state.fairness.reserve(&entry.owner, 1)?.keep();
    let id = entry.id.to_string();
    let resumed = tokio::task::spawn_blocking(move || {
        let loaded = config
            .store
            .load(&id, &served.digest, &config.cpu)
            .map_err(Ok)?;
        let session = served
            .workers
            .resume_session(loaded.paused, &loaded.files)
            .map_err(|e| Err(worker_error(e, "session")))?;
        config.store.mark_running(&id);
        config.store.remove_pauses(&id);
        Ok::<_, Result<PausedError, ApiError>>(session)
    })
    .await
    .map_err(|e| ApiError::internal(format!("resume thread failed: {e}")))?;
    match resumed {
        Ok(session) => {
            entry.set_running(session.host_bytes());
            state.metrics.sessions_resumed.inc();
            state
                .metrics
                .sessions_paused_now
                .set(state.sessions.paused_count() as i64);
            tracing::info!(session = %entry.id, "session resumed");
            Ok(session)
        }
        Err(e) => {
            state.fairness.release(&entry.owner, 1);
            Err(match e {
                Ok(e @ (PausedError::CpuMismatch(_) | PausedError::TemplateChanged { .. })) => {
                    ApiError::conflict("cannot_resume", e.to_string())
                }
                Ok(e) => {
                    tracing::error!(session = %entry.id, error = %e, "a paused session is unusable");
                    ApiError::conflict("session_lost", format!("{e}; delete the session"))
                }
                Err(api) => api,
            })
        }
    }
}

/// Pauses every running session idle longer than `idle`, a few at a time.
pub async fn pause_idle(state: &Arc<AppState>, idle: Duration) {
    let entries = state.sessions.idle_running(idle);
    let mut running = tokio::task::JoinSet::new();
    for entry in entries {
        while running.len() >= PAUSES_AT_ONCE {
            running.join_next().await;
        }
        let state = state.clone();
        running.spawn(async move {
            if let Err(e) = pause(&state, &entry).await {
                *entry.pause_refused.lock().expect("session lock") = Some(Instant::now());
                tracing::warn!(session = %entry.id, error = %e.message, "idle session not paused");
            }
        });
    }
    while running.join_next().await.is_some() {}
}

/// Serves the sessions a previous server left paused, and says how many it lost.
pub fn recover(state: &AppState) {
    let Some(config) = &state.config.paused else {
        return;
    };
    let recovered = config.store.recover();
    let mut served = 0;
    for manifest in &recovered.paused {
        let Some(entry) = SessionEntry::paused(
            &manifest.record,
            manifest.paused_unix,
            manifest.stored_bytes,
        ) else {
            continue;
        };
        served += 1;
        state.sessions.insert(Arc::new(entry));
    }
    for (id, why) in &recovered.unreadable {
        tracing::error!(session = %id, why, "a paused session could not be read; deleted");
    }
    let lost = recovered.lost.len() + recovered.unreadable.len();
    state.metrics.sessions_lost.inc_by(lost as u64);
    state.metrics.sessions_paused_now.set(served as i64);
    tracing::info!(
        paused = served,
        lost,
        "sessions recovered from the paused store"
    );
    eprintln!(
        "forkvm: {served} paused session(s) recovered; {lost} session(s) lost (running when the server last stopped without pausing them, or unreadable)"
    );
}

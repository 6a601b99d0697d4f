//! Live sessions: which key owns each, when it was last used, and expiry after its idle TTL.
//! A session belongs to the key that created it: for any other key it does not exist (404).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use forkvm_template::paused::SessionRecord;
use forkvm_worker::RemoteSession as Session;
use uuid::Uuid;

use crate::wire::SessionInfo;

/// Where a session is: in a worker, or stored on disk.
pub enum Held {
    Running(Session),
    /// Paused: its state is in the server's paused store.
    Paused,
}

/// One session and its bookkeeping.
pub struct SessionEntry {
    pub id: Uuid,
    pub owner: String,
    pub template: String,
    pub metadata: BTreeMap<String, String>,
    pub ttl: Duration,
    created: SystemTime,
    last_used: Mutex<(Instant, SystemTime)>,
    /// The sandbox; `None` while a request has it out on a blocking thread, or once the
    /// session is deleted.
    pub session: tokio::sync::Mutex<Option<Held>>,
    /// Host memory the session held after its last request (see `RemoteSession`).
    host_bytes: AtomicU64,
    /// Whether it is paused, and the bytes its pause takes on disk.
    paused: AtomicBool,
    stored_bytes: AtomicU64,
    /// When pausing it last failed (processes running, quota): idle pausing waits before
    /// trying again.
    pub pause_refused: Mutex<Option<Instant>>,
    /// When its running state was last checkpointed to disk.
    checkpointed: Mutex<Option<Instant>>,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl SessionEntry {
    pub fn new(
        owner: &str,
        template: &str,
        metadata: BTreeMap<String, String>,
        ttl: Duration,
        session: Session,
    ) -> SessionEntry {
        let now = SystemTime::now();
        let host_bytes = AtomicU64::new(session.host_bytes());
        SessionEntry {
            host_bytes,
            id: Uuid::now_v7(),
            owner: owner.to_string(),
            template: template.to_string(),
            metadata,
            ttl,
            created: now,
            last_used: Mutex::new((Instant::now(), now)),
            session: tokio::sync::Mutex::new(Some(Held::Running(session))),
            paused: AtomicBool::new(false),
            stored_bytes: AtomicU64::new(0),
            pause_refused: Mutex::new(None),
            checkpointed: Mutex::new(None),
        }
    }

    /// A session found paused on disk when the server started (`record`, paused at
    /// `paused_unix`, its pause taking `stored_bytes`). Its idle time counts from the pause.
    pub fn paused(
        record: &SessionRecord,
        paused_unix: u64,
        stored_bytes: u64,
    ) -> Option<SessionEntry> {
        let id = Uuid::parse_str(&record.id).ok()?;
        let paused_at = UNIX_EPOCH + Duration::from_secs(paused_unix);
        let idle = SystemTime::now()
            .duration_since(paused_at)
            .unwrap_or_default();
        let last_used = Instant::now()
            .checked_sub(idle)
            .unwrap_or_else(Instant::now);
        Some(SessionEntry {
            host_bytes: AtomicU64::new(0),
            id,
            owner: record.owner.clone(),
            template: record.template.clone(),
            metadata: record.metadata.clone(),
            ttl: Duration::from_secs(record.ttl_seconds),
            created: UNIX_EPOCH + Duration::from_secs(record.created_unix),
            last_used: Mutex::new((last_used, paused_at)),
            session: tokio::sync::Mutex::new(Some(Held::Paused)),
            paused: AtomicBool::new(true),
            stored_bytes: AtomicU64::new(stored_bytes),
            pause_refused: Mutex::new(None),
            checkpointed: Mutex::new(None),
        })
    }

    /// What a pause stores about the session besides its state.
    pub fn record(&self) -> SessionRecord {
        SessionRecord {
            id: self.id.to_string(),
            owner: self.owner.clone(),
            template: self.template.clone(),
            metadata: self.metadata.clone(),
            ttl_seconds: self.ttl.as_secs(),
            created_unix: unix(self.created),
        }
    }

    /// Notes that the session is paused now, its pause taking `stored_bytes` on disk.
    pub fn set_paused(&self, stored_bytes: u64) {
        self.paused.store(true, Ordering::Relaxed);
        self.stored_bytes.store(stored_bytes, Ordering::Relaxed);
        self.host_bytes.store(0, Ordering::Relaxed);
    }

    /// Notes a checkpoint of the running session, taken at `at` and storing `stored_bytes`.
    pub fn set_checkpointed(&self, stored_bytes: u64, at: Instant) {
        self.stored_bytes.store(stored_bytes, Ordering::Relaxed);
        *self.checkpointed.lock().expect("session lock") = Some(at);
    }

    /// Whether it was used since its last checkpoint (or never had one).
    fn used_since_checkpoint(&self) -> bool {
        let last_used = self.last_used.lock().expect("session lock").0;
        self.checkpointed
            .lock()
            .expect("session lock")
            .is_none_or(|at| last_used > at)
    }

    /// Notes that the session runs again, holding `host_bytes`.
    pub fn set_running(&self, host_bytes: u64) {
        self.paused.store(false, Ordering::Relaxed);
        self.stored_bytes.store(0, Ordering::Relaxed);
        self.host_bytes.store(host_bytes, Ordering::Relaxed);
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    pub fn stored_bytes(&self) -> u64 {
        self.stored_bytes.load(Ordering::Relaxed)
    }

    /// Marks the session as used now (restarting its TTL), holding `host_bytes`.
    pub fn touch(&self, host_bytes: u64) {
        *self.last_used.lock().expect("session lock") = (Instant::now(), SystemTime::now());
        self.host_bytes.store(host_bytes, Ordering::Relaxed);
    }

    pub fn host_bytes(&self) -> u64 {
        self.host_bytes.load(Ordering::Relaxed)
    }

    pub fn idle_for(&self) -> Duration {
        self.last_used.lock().expect("session lock").0.elapsed()
    }

    /// The API's view; `alive` is read without waiting for a running request.
    pub fn info(&self) -> SessionInfo {
        let (_, last_used) = *self.last_used.lock().expect("session lock");
        let alive = match self.session.try_lock() {
            Ok(guard) => match guard.as_ref() {
                Some(Held::Running(session)) => session.alive(),
                Some(Held::Paused) => true,
                None => false,
            },
            Err(_) => true,
        };
        let paused = self.is_paused();
        SessionInfo {
            id: self.id,
            template: self.template.clone(),
            created_at: unix(self.created),
            last_used_at: unix(last_used),
            expires_at: unix(last_used + self.ttl),
            ttl_seconds: self.ttl.as_secs(),
            metadata: self.metadata.clone(),
            alive,
            memory_bytes: self.host_bytes(),
            state: if paused { "paused" } else { "running" }.to_string(),
            stored_bytes: self.stored_bytes(),
        }
    }
}

/// All live sessions.
#[derive(Clone, Default)]
pub struct SessionStore {
    entries: Arc<Mutex<HashMap<Uuid, Arc<SessionEntry>>>>,
}

impl SessionStore {
    pub fn insert(&self, entry: Arc<SessionEntry>) {
        self.entries
            .lock()
            .expect("sessions lock")
            .insert(entry.id, entry);
    }

    /// Session `id` if `owner` owns it.
    pub fn get(&self, id: Uuid, owner: &str) -> Option<Arc<SessionEntry>> {
        self.entries
            .lock()
            .expect("sessions lock")
            .get(&id)
            .filter(|e| e.owner == owner)
            .cloned()
    }

    /// Removes session `id` if `owner` owns it.
    pub fn remove(&self, id: Uuid, owner: &str) -> Option<Arc<SessionEntry>> {
        let mut entries = self.entries.lock().expect("sessions lock");
        match entries.get(&id) {
            Some(entry) if entry.owner == owner => entries.remove(&id),
            _ => None,
        }
    }

    /// `owner`'s sessions, oldest first.
    pub fn list(&self, owner: &str) -> Vec<Arc<SessionEntry>> {
        let mut list: Vec<_> = self
            .entries
            .lock()
            .expect("sessions lock")
            .values()
            .filter(|e| e.owner == owner)
            .cloned()
            .collect();
        list.sort_by_key(|e| e.id);
        list
    }

    /// Every session, oldest first.
    pub fn list_all(&self) -> Vec<Arc<SessionEntry>> {
        let mut list: Vec<_> = self
            .entries
            .lock()
            .expect("sessions lock")
            .values()
            .cloned()
            .collect();
        list.sort_by_key(|e| e.id);
        list
    }

    /// `measure` summed over `owner`'s sessions.
    fn sum_of(&self, owner: &str, measure: impl Fn(&SessionEntry) -> u64) -> u64 {
        let entries = self.entries.lock().expect("sessions lock");
        entries
            .values()
            .filter(|e| e.owner == owner)
            .map(|e| measure(e))
            .sum()
    }

    /// Host memory `owner`'s sessions hold.
    pub fn host_bytes_of(&self, owner: &str) -> u64 {
        self.sum_of(owner, SessionEntry::host_bytes)
    }

    /// Disk bytes `owner`'s paused (or checkpointed) sessions hold.
    pub fn stored_bytes_of(&self, owner: &str) -> u64 {
        self.sum_of(owner, SessionEntry::stored_bytes)
    }

    /// Running sessions idle longer than `idle`, not in use, able to run, and not refused
    /// a pause within the last `idle`: the ones to pause.
    pub fn idle_running(&self, idle: Duration) -> Vec<Arc<SessionEntry>> {
        let pausable = |e: &SessionEntry| {
            let refused = e.pause_refused.lock().expect("session lock");
            refused.is_none_or(|at| at.elapsed() > idle)
                && matches!(
                    e.session.try_lock().as_deref(),
                    Ok(Some(Held::Running(session))) if session.alive()
                )
        };
        self.entries
            .lock()
            .expect("sessions lock")
            .values()
            .filter(|e| !e.is_paused() && e.idle_for() > idle && pausable(e))
            .cloned()
            .collect()
    }

    /// Running sessions used since their last checkpoint, not in use now.
    pub fn used_since_checkpoint(&self) -> Vec<Arc<SessionEntry>> {
        let entries = self.entries.lock().expect("sessions lock");
        entries
            .values()
            .filter(|e| !e.is_paused() && e.used_since_checkpoint() && e.session.try_lock().is_ok())
            .cloned()
            .collect()
    }

    /// Sessions paused now.
    pub fn paused_count(&self) -> usize {
        let entries = self.entries.lock().expect("sessions lock");
        entries.values().filter(|e| e.is_paused()).count()
    }

    pub fn len(&self) -> usize {
        self.entries.lock().expect("sessions lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes and returns every session idle longer than its TTL (and not running).
    pub fn take_expired(&self) -> Vec<Arc<SessionEntry>> {
        let mut entries = self.entries.lock().expect("sessions lock");
        let expired: Vec<Uuid> = entries
            .values()
            .filter(|e| e.idle_for() > e.ttl && e.session.try_lock().is_ok())
            .map(|e| e.id)
            .collect();
        expired.iter().filter_map(|id| entries.remove(id)).collect()
    }

    /// Removes and returns every session (at shutdown).
    pub fn take_all(&self) -> Vec<Arc<SessionEntry>> {
        self.entries
            .lock()
            .expect("sessions lock")
            .drain()
            .map(|(_, e)| e)
            .collect()
    }
}

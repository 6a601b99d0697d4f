//! User and group ids per process: every sandbox starts as root (uid and gid 0), and a
//! process may change its own ids as Linux allows (`setuid`, `setresgid`, `setgroups`…),
//! which `subprocess`'s `user=`/`group=` and privilege-dropping programs use. Children
//! inherit them. Files are not checked against them: a sandbox's files are all its own.

use syscalls::Errno;

use super::SysResult;
use crate::process::Process;

/// Supplementary groups a process may have (`NGROUPS_MAX`).
const MAX_GROUPS: usize = 65536;

/// A process's ids: real, effective and saved, of user and group, and its groups.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Creds {
    pub uid: [u32; 3],
    pub gid: [u32; 3],
    pub groups: Vec<u32>,
}

/// Which of user or group ids a call changes.
#[derive(Clone, Copy)]
pub(crate) enum Ids {
    User,
    Group,
}

/// `-1` (as the 32-bit id it is) leaves an id unchanged.
const UNCHANGED: u32 = u32::MAX;

impl Process {
    pub(crate) fn creds(&self) -> &Creds {
        &self.procs.entries[&self.pid()].creds
    }

    fn creds_mut(&mut self) -> &mut Creds {
        let pid = self.pid();
        &mut self
            .procs
            .entries
            .get_mut(&pid)
            .expect("the current process")
            .creds
    }

    /// Whether the caller may set any id (its effective user is root).
    fn privileged(&self) -> bool {
        self.creds().uid[1] == 0
    }

    fn ids(&self, which: Ids) -> [u32; 3] {
        match which {
            Ids::User => self.creds().uid,
            Ids::Group => self.creds().gid,
        }
    }

    fn set_ids(&mut self, which: Ids, ids: [u32; 3]) {
        let creds = self.creds_mut();
        match which {
            Ids::User => creds.uid = ids,
            Ids::Group => creds.gid = ids,
        }
    }

    /// `getuid`/`getgid` (`index` 0) and `geteuid`/`getegid` (1).
    pub(crate) fn sys_getid(&self, which: Ids, index: usize) -> SysResult {
        Ok(u64::from(self.ids(which)[index]))
    }

    pub(crate) fn sys_getresid(&mut self, which: Ids, addrs: [u64; 3]) -> SysResult {
        let ids = self.ids(which);
        for (addr, id) in addrs.into_iter().zip(ids) {
            self.write_obj(addr, &id)?;
        }
        Ok(0)
    }

    /// `setresuid`/`setresgid`: each id that is not -1 becomes its new value; without
    /// privilege only to one of the three the process already has.
    pub(crate) fn sys_setresid(&mut self, which: Ids, wanted: [u32; 3]) -> SysResult {
        let current = self.ids(which);
        let allowed = |id: u32| id == UNCHANGED || current.contains(&id);
        if !self.privileged() && !wanted.into_iter().all(allowed) {
            return Err(Errno::EPERM.into());
        }
        let mut ids = current;
        for (slot, id) in ids.iter_mut().zip(wanted) {
            if id != UNCHANGED {
                *slot = id;
            }
        }
        self.set_ids(which, ids);
        Ok(0)
    }

    /// `setuid`/`setgid`: with privilege all three ids; otherwise the effective one, to the
    /// real or saved id.
    pub(crate) fn sys_setid(&mut self, which: Ids, id: u32) -> SysResult {
        if id == UNCHANGED {
            return Err(Errno::EINVAL.into());
        }
        if self.privileged() {
            self.set_ids(which, [id; 3]);
            return Ok(0);
        }
        let mut ids = self.ids(which);
        if id != ids[0] && id != ids[2] {
            return Err(Errno::EPERM.into());
        }
        ids[1] = id;
        self.set_ids(which, ids);
        Ok(0)
    }

    /// `setreuid`/`setregid`: real and effective ids; the saved id follows the effective
    /// one when the real one is set or the effective one leaves the real one.
    pub(crate) fn sys_setreid(&mut self, which: Ids, real: u32, effective: u32) -> SysResult {
        let current = self.ids(which);
        let ok_real = real == UNCHANGED || real == current[0] || real == current[1];
        let ok_effective = effective == UNCHANGED || current.contains(&effective);
        if !(self.privileged() || ok_real && ok_effective) {
            return Err(Errno::EPERM.into());
        }
        let mut ids = current;
        if real != UNCHANGED {
            ids[0] = real;
        }
        if effective != UNCHANGED {
            ids[1] = effective;
        }
        if real != UNCHANGED || (effective != UNCHANGED && effective != current[0]) {
            ids[2] = ids[1];
        }
        self.set_ids(which, ids);
        Ok(0)
    }

    pub(crate) fn sys_getgroups(&mut self, size: i32, list: u64) -> SysResult {
        let groups = self.creds().groups.clone();
        let size = usize::try_from(size).map_err(|_| Errno::EINVAL)?;
        if size == 0 {
            return Ok(groups.len() as u64);
        }
        if size < groups.len() {
            return Err(Errno::EINVAL.into());
        }
        self.write_objs(list, &groups)?;
        Ok(groups.len() as u64)
    }

    pub(crate) fn sys_setgroups(&mut self, size: u64, list: u64) -> SysResult {
        if !self.privileged() {
            return Err(Errno::EPERM.into());
        }
        let size = usize::try_from(size)
            .ok()
            .filter(|&n| n <= MAX_GROUPS)
            .ok_or(Errno::EINVAL)?;
        let groups: Vec<u32> = self.read_objs(list, size)?;
        self.creds_mut().groups = groups;
        Ok(0)
    }

    /// `setfsuid`/`setfsgid`: the filesystem id is the effective one here; returns it.
    pub(crate) fn sys_setfsid(&mut self, which: Ids) -> SysResult {
        Ok(u64::from(self.ids(which)[1]))
    }
}

//! The Unix users tasks run as (`policy.run_as`): looked up once at start in the passwd
//! database, and whether this process may switch to them. A leaf: it knows nothing of
//! policies, configs or tasks.

use std::ffi::{CStr, CString};
use std::io;

/// The largest buffer a passwd lookup may use (1 MiB). Real entries are well under 1 KiB;
/// the cap only stops a broken NSS module from making the lookup grow without end.
const MAX_PASSWD_BUF: usize = 1024 * 1024;

/// A user tasks run as, looked up once at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The name from the passwd database, for logs and errors.
    pub name: String,
    pub uid: libc::uid_t,
    /// The user's primary group; supplementary groups are cleared, not inherited.
    pub gid: libc::gid_t,
}

/// This process's effective user id.
pub fn effective_uid() -> libc::uid_t {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Who `run_as` should make tasks: root may become anyone; any other user only itself
/// (then there is nothing to switch, hence `None`).
pub fn identity_to_switch_to(
    euid: libc::uid_t,
    wanted: Identity,
) -> Result<Option<Identity>, String> {
    if euid == 0 {
        Ok(Some(wanted))
    } else if wanted.uid == euid {
        Ok(None)
    } else {
        Err(format!(
            "the drone runs as uid {euid}, not as root, so it cannot run tasks as `{}` \
             (uid {}); start the drone as root or remove `run_as`",
            wanted.name, wanted.uid
        ))
    }
}

/// Looks a user up by name, or by uid when `spec` is a number.
pub fn lookup_user(spec: &str) -> Result<Identity, String> {
    let found = if let Ok(uid) = spec.parse::<libc::uid_t>() {
        passwd_entry(|pwd, buf, result| {
            // SAFETY: every pointer is valid for the call and `buf.len()` is its size.
            unsafe { libc::getpwuid_r(uid, pwd, buf.as_mut_ptr(), buf.len(), result) }
        })
    } else {
        let name =
            CString::new(spec).map_err(|_| format!("user name {spec:?} contains a NUL byte"))?;
        passwd_entry(|pwd, buf, result| {
            // SAFETY: `name` is NUL-terminated; the rest as above.
            unsafe { libc::getpwnam_r(name.as_ptr(), pwd, buf.as_mut_ptr(), buf.len(), result) }
        })
    };
    match found {
        Ok(Some(identity)) => Ok(identity),
        Ok(None) => Err(format!("there is no user `{spec}` on this host")),
        Err(e) => Err(format!("could not look up user `{spec}`: {e}")),
    }
}

/// Runs a `getpw*_r` call with a buffer that grows until the entry fits.
fn passwd_entry(
    call: impl Fn(&mut libc::passwd, &mut [libc::c_char], &mut *mut libc::passwd) -> libc::c_int,
) -> io::Result<Option<Identity>> {
    let mut size = 1024;
    loop {
        let mut buf: Vec<libc::c_char> = vec![0; size];
        // SAFETY: passwd is a plain C struct; all-zero (null pointers) is a valid value,
        // and the call overwrites it before we read it.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = call(&mut pwd, &mut buf, &mut result);
        if rc == libc::ERANGE && size < MAX_PASSWD_BUF {
            size *= 2;
            continue;
        }
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        if result.is_null() {
            return Ok(None);
        }
        let name = if pwd.pw_name.is_null() {
            String::new()
        } else {
            // SAFETY: on success pw_name points at a NUL-terminated string inside `buf`,
            // which is still alive.
            unsafe { CStr::from_ptr(pwd.pw_name) }
                .to_string_lossy()
                .into_owned()
        };
        return Ok(Some(Identity {
            name,
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_found_by_name_or_uid() {
        let root = lookup_user("root").expect("root exists");
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(lookup_user("0").map(|r| r.name), Ok("root".to_owned()));
        let e = lookup_user("no-such-user-hive").err().unwrap_or_default();
        assert!(e.contains("no-such-user-hive"), "{e}");
        assert!(lookup_user("a\0b").is_err());
    }
}

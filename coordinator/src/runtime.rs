//! Where coordinators on this host say they listen, so that the client commands find a
//! `coordinator run` (which listens on a random loopback port) or a `serve` without being told.
//! Each running `run` or `serve` keeps one small JSON file, `<runtime dir>/mgd3/coordinator-<pid>.json`
//! (`$XDG_RUNTIME_DIR`, else the temp folder), removed when it stops; a file whose process is gone
//! (a killed coordinator) is ignored and swept. [`Connection`](crate::cli::Connection) uses them
//! when neither `--coordinator` nor `MGD3_COORDINATOR` is given.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What a running coordinator says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// The URL its clients use.
    pub url: String,
    /// The store it serves.
    pub store: String,
    /// Its process id.
    pub pid: u32,
    /// The token file it was started with (a path, never the token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
    /// When it started serving (Unix ms).
    pub started_unix_ms: u64,
}

/// The folder of the announcements: `$XDG_RUNTIME_DIR/mgd3`, else `<temp>/mgd3-<uid>`.
fn folder() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("mgd3"),
        // SAFETY: getuid has no preconditions and cannot fail.
        None => std::env::temp_dir().join(format!("mgd3-{}", unsafe { libc::getuid() })),
    }
}

/// This process's announcement; the file goes when it is dropped.
#[derive(Debug)]
pub struct Announced {
    file: PathBuf,
}

impl Drop for Announced {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
    }
}

/// Announces this process as the coordinator at `url` serving `store`. `None` (with a DEBUG line)
/// when the file cannot be written: clients then need `--coordinator`, nothing else changes.
pub fn announce(url: &str, store: &str, token_file: Option<&Path>) -> Option<Announced> {
    let dir = folder();
    let pid = std::process::id();
    let record = Announcement {
        url: url.to_owned(),
        store: store.to_owned(),
        pid,
        token_file: token_file.map(|f| std::path::absolute(f).unwrap_or(f.to_owned()).display().to_string()),
        started_unix_ms: mgd3_common::now_ms(),
    };
    let file = dir.join(format!("coordinator-{pid}.json"));
    let written = std::fs::create_dir_all(&dir).and_then(|()| {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        }
        std::fs::write(&file, serde_json::to_vec(&record).expect("serialisable announcement"))
    });
    match written {
        Ok(()) => Some(Announced { file }),
        Err(error) => {
            tracing::debug!(file = %file.display(), %error, "cannot announce this coordinator to local clients");
            None
        }
    }
}

/// The coordinators running on this host, newest first; files of processes that are gone are
/// removed.
pub fn running() -> Vec<Announcement> {
    let Ok(entries) = std::fs::read_dir(folder()) else { return Vec::new() };
    let mut live = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        let Some(record) = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Announcement>(&b).ok())
        else {
            continue;
        };
        if process_exists(record.pid) {
            live.push(record);
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }
    live.sort_by_key(|a| std::cmp::Reverse(a.started_unix_ms));
    live
}

/// Whether process `pid` exists in this process's PID namespace (one of another user counts).
pub(crate) fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: kill with signal 0 sends nothing; it only asks whether `pid` exists.
    (unsafe { libc::kill(pid, 0) }) == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

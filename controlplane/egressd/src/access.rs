//! Who may use the control socket, and for what.
//!
//! | peer | may send |
//! |---|---|
//! | root, members of `egressd --socket-group` | every request |
//! | members of the policy's `[control] read_group` | `status`, `events`, `dns` |
//! | anyone else | nothing: refused before the daemon reads a byte |
//!
//! Two gates, so that a mistake in one does not open the other. The socket file's
//! permissions let the kernel refuse `connect` to everyone else: mode 0600 (0660 owned by the
//! socket group), plus a POSIX ACL entry for the read group. An ACL rather than a second
//! owning group: a file has one group, and granting the read group by ACL needs no
//! CAP_CHOWN. Then the daemon judges each request by the credentials the kernel recorded
//! when the peer connected (`SO_PEERCRED`), its supplementary groups from /proc.

use std::path::{Path, PathBuf};
use std::sync::RwLock;

use egressd_policy::{GroupRef, Policy, PolicyError};
use egressd_proto::Request;

/// What a peer may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Root or a member of `--socket-group`: everything.
    Control,
    /// A member of `[control] read_group`: read-only requests.
    Read,
}

/// The credentials of a connected peer, as the kernel recorded them at `connect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (read from /proc/PID/status at accept time; empty when the
    /// process is gone or no longer has the credentials it connected with).
    pub groups: Vec<u32>,
}

impl Peer {
    /// The peer of `stream`; `None` when the kernel cannot tell (never for a Unix socket).
    pub fn of(stream: &tokio::net::UnixStream) -> Option<Peer> {
        let cred = stream.peer_cred().ok()?;
        let groups = cred
            .pid()
            .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
            .map(|status| supplementary_groups(&status, cred.uid(), cred.gid()))
            .unwrap_or_default();
        Some(Peer {
            uid: cred.uid(),
            gid: cred.gid(),
            groups,
        })
    }

    fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

/// The `Groups:` of a /proc/PID/status, if the process still has the effective uid and gid
/// the kernel recorded at connect (a pid that exited and was reused by another user's process
/// lends its groups to nobody).
fn supplementary_groups(status: &str, uid: u32, gid: u32) -> Vec<u32> {
    let field = |name: &str, index: usize| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|values| values.split_whitespace().nth(index))
            .and_then(|value| value.parse::<u32>().ok())
    };
    // Uid:/Gid: list real, effective, saved and filesystem ids; SO_PEERCRED holds the
    // effective ones.
    if field("Uid:", 1) != Some(uid) || field("Gid:", 1) != Some(gid) {
        return Vec::new();
    }
    status
        .lines()
        .find_map(|line| line.strip_prefix("Groups:"))
        .map(|groups| {
            groups
                .split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The access rules in force and the socket file they are written to.
#[derive(Debug)]
pub struct Access {
    socket: PathBuf,
    /// `--socket-group`: owns the socket file, members may do everything.
    control_group: Option<u32>,
    /// `[control] read_group` of the policy in force.
    read_group: RwLock<Option<u32>>,
}

impl Access {
    /// The rules for a socket that [`crate::control::bind`] created with `control_group`.
    pub fn new(socket: &Path, control_group: Option<u32>) -> Access {
        Access {
            socket: socket.to_owned(),
            control_group,
            read_group: RwLock::new(None),
        }
    }

    pub fn read_group(&self) -> Option<u32> {
        self.read_group.read().map_or(None, |group| *group)
    }

    /// Puts a read group in force (or none). Requests are judged by it at once; then the
    /// socket's ACL is rewritten. An error there is logged and leaves the socket no more
    /// open than the rules in force: a group that was removed may still connect but is
    /// refused every request; a group that was added cannot connect yet.
    pub fn set_read_group(&self, gid: Option<u32>) {
        let previous = match self.read_group.write() {
            Ok(mut group) => std::mem::replace(&mut *group, gid),
            Err(_) => {
                tracing::error!("control socket access rules are poisoned; read group unchanged");
                return;
            }
        };
        if previous == gid {
            return;
        }
        match self.write_socket_permissions(gid) {
            Ok(()) => tracing::info!(
                socket = %self.socket.display(),
                read_group = ?gid,
                "control socket permissions updated"
            ),
            Err(e) => tracing::error!(
                socket = %self.socket.display(),
                read_group = ?gid,
                "updating the control socket's permissions: {e:#}; members of the read group \
                 cannot connect until they are fixed"
            ),
        }
    }

    /// Mode 0600 (0660 for the socket group), plus a named-group ACL entry for the read
    /// group when it is not the socket group already.
    fn write_socket_permissions(&self, read_group: Option<u32>) -> anyhow::Result<()> {
        use anyhow::Context as _;
        use std::os::unix::fs::PermissionsExt as _;
        let base_mode = if self.control_group.is_some() {
            0o660
        } else {
            0o600
        };
        match read_group.filter(|gid| Some(*gid) != self.control_group) {
            Some(gid) => {
                let acl = acl_xattr(self.control_group.is_some(), gid);
                rustix::fs::setxattr(
                    &self.socket,
                    ACL_XATTR,
                    &acl,
                    rustix::fs::XattrFlags::empty(),
                )
                .with_context(|| {
                    format!(
                        "granting group {gid} access to {} (a POSIX ACL: does the file \
                         system support ACLs?)",
                        self.socket.display()
                    )
                })?;
            }
            None => {
                match rustix::fs::removexattr(&self.socket, ACL_XATTR) {
                    Ok(()) | Err(rustix::io::Errno::NODATA) => {}
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!("removing the read group's ACL of {}", self.socket.display())
                        });
                    }
                }
                // Setting the ACL had made the group bits its mask.
                std::fs::set_permissions(&self.socket, std::fs::Permissions::from_mode(base_mode))
                    .with_context(|| format!("restricting {}", self.socket.display()))?;
            }
        }
        Ok(())
    }

    /// What `peer` may do, by the rules in force now; `None`: nothing.
    pub fn role(&self, peer: &Peer) -> Option<Role> {
        if peer.uid == 0 || self.control_group.is_some_and(|gid| peer.in_group(gid)) {
            Some(Role::Control)
        } else if self.read_group().is_some_and(|gid| peer.in_group(gid)) {
            Some(Role::Read)
        } else {
            None
        }
    }

    /// `Ok` when `role` may send `request`, else the refusal to send back.
    pub fn check(&self, role: Role, request: &Request) -> Result<(), String> {
        match role {
            Role::Control => Ok(()),
            Role::Read if request.is_read_only() => Ok(()),
            Role::Read => Err(format!(
                "permission denied: {} changes egressd's state; members of [control] \
                 read_group may only use status, events and dns (root and members of \
                 egressd's --socket-group may do everything)",
                request.kind()
            )),
        }
    }
}

/// What anyone outside the rules is told before the connection closes.
pub fn refusal(peer: Option<&Peer>) -> String {
    let who = peer.map_or_else(
        || "this client".to_owned(),
        |peer| format!("uid {}", peer.uid),
    );
    format!(
        "permission denied: {who} may not use egressd's control socket (root and members of \
         egressd's --socket-group may; members of the policy's [control] read_group may use \
         status, events and dns)"
    )
}

/// The extended attribute that holds a file's access ACL.
const ACL_XATTR: &str = "system.posix_acl_access";

/// The ACL `user::rw-, group::rw- or ---, group:GID:rw-, mask::rw-, other::---` in the
/// kernel's xattr format (linux/posix_acl_xattr.h): a little-endian version 2 header, then
/// `{u16 tag, u16 permissions, u32 id}` entries sorted by tag.
fn acl_xattr(owning_group_may_connect: bool, read_gid: u32) -> Vec<u8> {
    const VERSION: u32 = 2;
    const USER_OBJ: u16 = 0x01;
    const GROUP_OBJ: u16 = 0x04;
    const GROUP: u16 = 0x08;
    const MASK: u16 = 0x10;
    const OTHER: u16 = 0x20;
    const NO_ID: u32 = u32::MAX;
    const READ_WRITE: u16 = 0o6;
    let owning_group = if owning_group_may_connect {
        READ_WRITE
    } else {
        0
    };
    let entries = [
        (USER_OBJ, READ_WRITE, NO_ID),
        (GROUP_OBJ, owning_group, NO_ID),
        (GROUP, READ_WRITE, read_gid),
        (MASK, READ_WRITE, NO_ID),
        (OTHER, 0, NO_ID),
    ];
    let mut xattr = VERSION.to_le_bytes().to_vec();
    for (tag, permissions, id) in entries {
        xattr.extend_from_slice(&tag.to_le_bytes());
        xattr.extend_from_slice(&permissions.to_le_bytes());
        xattr.extend_from_slice(&id.to_le_bytes());
    }
    xattr
}

/// The read group of `policy` as a GID: names are looked up in the system's group database.
/// An unknown name is an error at the value's place in the file, like any other mistake in
/// it.
pub fn resolve_read_group(policy: &Policy) -> Result<Option<u32>, PolicyError> {
    let Some(setting) = &policy.control.read_group else {
        return Ok(None);
    };
    let invalid = |message: String| PolicyError::Invalid {
        path: policy.source.path.clone(),
        diagnostics: vec![egressd_policy::Diagnostic::new(setting.location, message)],
    };
    match &setting.group {
        GroupRef::Id(gid) => Ok(Some(*gid)),
        GroupRef::Name(name) => match nix::unistd::Group::from_name(name) {
            Ok(Some(group)) => Ok(Some(group.gid.as_raw())),
            Ok(None) => Err(invalid(format!(
                "read_group {name:?}: no such group on this system (create it, or give a \
                 numeric GID)"
            ))),
            Err(e) => Err(invalid(format!(
                "read_group {name:?}: looking it up in the group database failed: {e}"
            ))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tegressctl\nUid:\t1000\t1000\t1000\t1000\n\
                          Gid:\t1000\t1000\t1000\t1000\nGroups:\t4 27 1042 \n";

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer {
            uid,
            gid,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn supplementary_groups_only_for_the_same_credentials() {
        assert_eq!(supplementary_groups(STATUS, 1000, 1000), vec![4, 27, 1042]);
        assert!(supplementary_groups(STATUS, 1001, 1000).is_empty());
        assert!(supplementary_groups(STATUS, 1000, 0).is_empty());
        assert!(supplementary_groups("Name:\tx\n", 1000, 1000).is_empty());
    }

    #[test]
    fn roles_follow_uid_socket_group_and_read_group() {
        let access = Access::new(Path::new("/nonexistent/egressd.sock"), Some(50));
        *access.read_group.write().expect("lock") = Some(1042);
        assert_eq!(access.role(&peer(0, 0, &[])), Some(Role::Control));
        assert_eq!(access.role(&peer(1000, 50, &[])), Some(Role::Control));
        assert_eq!(access.role(&peer(1000, 1000, &[50])), Some(Role::Control));
        assert_eq!(access.role(&peer(1000, 1000, &[4, 1042])), Some(Role::Read));
        assert_eq!(access.role(&peer(1000, 1042, &[])), Some(Role::Read));
        assert_eq!(access.role(&peer(1000, 1000, &[4, 27])), None);

        let root_only = Access::new(Path::new("/nonexistent/egressd.sock"), None);
        assert_eq!(root_only.role(&peer(1000, 1000, &[1042])), None);
        assert_eq!(root_only.role(&peer(0, 1000, &[])), Some(Role::Control));
    }

    #[test]
    fn readers_may_only_read() {
        let access = Access::new(Path::new("/nonexistent/egressd.sock"), None);
        assert!(access.check(Role::Read, &Request::Status).is_ok());
        assert!(
            access
                .check(Role::Read, &Request::Dns { workload: None })
                .is_ok()
        );
        let refused = access
            .check(Role::Read, &Request::Reload)
            .expect_err("a reader may not reload");
        assert!(
            refused.starts_with("permission denied: reload"),
            "{refused}"
        );
        assert!(access.check(Role::Control, &Request::Reload).is_ok());
    }

    #[test]
    fn acl_is_in_the_kernel_format() {
        let acl = acl_xattr(false, 1042);
        assert_eq!(acl.len(), 4 + 5 * 8);
        assert_eq!(&acl[..4], &[2, 0, 0, 0]);
        // The named group entry: tag 8, rw-, id 1042.
        assert_eq!(&acl[4 + 2 * 8..4 + 3 * 8], &[8, 0, 6, 0, 0x12, 0x04, 0, 0]);
        // The owning group's entry: nothing unless it is the socket group.
        assert_eq!(
            &acl[4 + 8..4 + 2 * 8],
            &[4, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]
        );
        assert_eq!(&acl_xattr(true, 1042)[4 + 8 + 2..4 + 8 + 4], &[6, 0]);
    }

    #[test]
    fn read_group_names_resolve_and_unknown_ones_name_the_line() {
        let path = Path::new("/etc/egressd/policy.toml");
        let policy = |group: &str| {
            egressd_policy::parse(
                &format!("mode = \"audit\"\n[control]\nread_group = {group}\n"),
                path,
            )
            .expect("valid policy")
        };
        assert_eq!(
            resolve_read_group(&policy("1042")).expect("a gid"),
            Some(1042)
        );
        // Every system has a root group.
        assert_eq!(
            resolve_read_group(&policy("\"root\"")).expect("root"),
            Some(0)
        );
        let error = resolve_read_group(&policy("\"no-such-group-egressd\""))
            .expect_err("unknown group")
            .to_string();
        assert!(
            error.starts_with(
                "/etc/egressd/policy.toml:3:14: read_group \"no-such-group-egressd\": no such group"
            ),
            "{error}"
        );
        assert_eq!(
            resolve_read_group(&egressd_policy::parse("", path).expect("empty policy"))
                .expect("none"),
            None
        );
    }
}

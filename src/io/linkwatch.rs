//! Carrier and address watch: the fastest local failure signal.
//!
//! A path's underlay interface is the one named by its `interface` key, or
//! else the one holding its `local` address. The kernel announces every
//! change of a link (admin state, carrier: `IFF_UP` / `IFF_LOWER_UP`) and
//! of an address on the rtnetlink multicast groups `RTNLGRP_LINK`,
//! `RTNLGRP_IPV4_IFADDR` and `RTNLGRP_IPV6_IFADDR`. This task subscribes to
//! them, dumps the current links and addresses once, and keeps a small
//! table ([`LinkTable`]). A path is *link-up* while its interface exists,
//! is up with carrier, and the path's local address is configured on the
//! host. Every change of that bit is sent to the BFD thread as
//! [`Command::Link`], where the engine takes the path out of service at
//! once (and back only after BFD has seen the far end again): a carrier
//! loss costs a few milliseconds instead of a BFD detection time. The
//! daemon hands the watch the list of running paths after start-up and
//! after every reload ([`LinkWatch::set_paths`]).

use super::control_plane::{Command, CommandLink};
use crate::PathId;
use futures::StreamExt;
use futures::TryStreamExt;
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::MulticastGroup;
use std::collections::{HashMap, HashSet};
use std::io;
use std::net::IpAddr;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// A path whose underlay is watched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchedPath {
    pub id: PathId,
    pub name: String,
    pub interface: Option<String>,
    pub local: IpAddr,
}

/// Links and addresses as last announced, and each path's verdict.
#[derive(Debug, Default)]
pub struct LinkTable {
    /// ifindex -> (name, up with carrier)
    links: HashMap<u32, (String, bool)>,
    addrs: HashSet<(u32, IpAddr)>,
    paths: Vec<WatchedPath>,
    reported: Vec<Option<bool>>,
}

impl LinkTable {
    pub fn new(paths: Vec<WatchedPath>) -> Self {
        let reported = vec![None; paths.len()];
        LinkTable {
            paths,
            reported,
            ..Default::default()
        }
    }

    /// Replaces the watched paths; a path that stays the same keeps its
    /// last verdict, a new one is reported only if it is down.
    pub fn set_paths(&mut self, paths: Vec<WatchedPath>) {
        let reported = paths
            .iter()
            .map(|p| {
                self.paths
                    .iter()
                    .position(|q| q == p)
                    .and_then(|i| self.reported.get(i).copied().flatten())
            })
            .collect();
        self.paths = paths;
        self.reported = reported;
    }

    /// A link appeared or changed.
    pub fn set_link(&mut self, index: u32, name: Option<String>, up: bool) {
        let entry = self.links.entry(index).or_insert((String::new(), false));
        if let Some(n) = name {
            entry.0 = n;
        }
        entry.1 = up;
    }

    pub fn remove_link(&mut self, index: u32) {
        self.links.remove(&index);
        self.addrs.retain(|(i, _)| *i != index);
    }

    pub fn set_address(&mut self, index: u32, ip: IpAddr, present: bool) {
        if present {
            self.addrs.insert((index, ip));
        } else {
            self.addrs.remove(&(index, ip));
        }
    }

    /// Whether a path's underlay can carry traffic now.
    pub fn path_up(&self, p: &WatchedPath) -> bool {
        let holder = self
            .addrs
            .iter()
            .find(|(_, ip)| *ip == p.local)
            .map(|(i, _)| *i);
        let Some(holder) = holder else {
            return false;
        };
        let index = match &p.interface {
            Some(name) => self
                .links
                .iter()
                .find(|(_, (n, _))| n == name)
                .map(|(i, _)| *i),
            None => Some(holder),
        };
        index
            .and_then(|i| self.links.get(&i))
            .is_some_and(|(_, up)| *up)
    }

    /// Paths whose verdict changed since the last call. The first call
    /// reports only paths that are down (the engine starts with every
    /// path's link assumed up).
    pub fn changes(&mut self) -> Vec<(PathId, bool)> {
        let mut out = Vec::new();
        for (i, p) in self.paths.iter().enumerate() {
            let up = self.path_up(p);
            let Some(last) = self.reported.get_mut(i) else {
                continue;
            };
            if *last != Some(up) && !(last.is_none() && up) {
                out.push((p.id, up));
            }
            *last = Some(up);
        }
        out
    }

    /// Applies one rtnetlink message; true when it concerned links or addresses.
    pub fn apply(&mut self, msg: &RouteNetlinkMessage) -> bool {
        match msg {
            RouteNetlinkMessage::NewLink(m) => {
                let (index, name, up) = link_facts(m);
                self.set_link(index, name, up);
            }
            RouteNetlinkMessage::DelLink(m) => self.remove_link(m.header.index),
            RouteNetlinkMessage::NewAddress(m) => {
                if let Some(ip) = address_of(m) {
                    self.set_address(m.header.index, ip, true);
                }
            }
            RouteNetlinkMessage::DelAddress(m) => {
                if let Some(ip) = address_of(m) {
                    self.set_address(m.header.index, ip, false);
                }
            }
            _ => return false,
        }
        true
    }

    /// The path's name, for logs.
    fn name(&self, id: PathId) -> &str {
        self.paths
            .iter()
            .find(|p| p.id == id)
            .map_or("?", |p| p.name.as_str())
    }
}

fn link_facts(m: &LinkMessage) -> (u32, Option<String>, bool) {
    let name = m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    });
    let up = m.header.flags.contains(LinkFlags::Up) && m.header.flags.contains(LinkFlags::LowerUp);
    (m.header.index, name, up)
}

fn address_of(m: &AddressMessage) -> Option<IpAddr> {
    // IFA_LOCAL is the local address on point-to-point links; IFA_ADDRESS otherwise.
    let local = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    local.or_else(|| {
        m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })
}

fn nl_err(what: &'static str) -> impl FnOnce(rtnetlink::Error) -> io::Error {
    move |e| io::Error::other(format!("{what}: {e}"))
}

/// The running watch: tell it which paths to watch.
pub struct LinkWatch {
    paths: mpsc::UnboundedSender<Vec<WatchedPath>>,
}

impl LinkWatch {
    /// Watches exactly these paths from now on.
    pub fn set_paths(&self, paths: Vec<WatchedPath>) {
        if self.paths.send(paths).is_err() {
            debug!("link watch has stopped");
        }
    }
}

/// Subscribes to link and address events and starts the watch task (on
/// the current tokio runtime), with no path yet. Fails when netlink is
/// unavailable.
pub async fn spawn(commands: CommandLink) -> io::Result<LinkWatch> {
    let groups = [
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
    ];
    let (conn, handle, mut messages) = rtnetlink::new_multicast_connection(&groups)?;
    tokio::spawn(conn);
    let mut table = LinkTable::new(Vec::new());
    // The subscription is live before the dump, so nothing falls between.
    let mut links = handle.link().get().execute();
    while let Some(m) = links.try_next().await.map_err(nl_err("dumping links"))? {
        table.apply(&RouteNetlinkMessage::NewLink(m));
    }
    let mut addrs = handle.address().get().execute();
    while let Some(m) = addrs
        .try_next()
        .await
        .map_err(nl_err("dumping addresses"))?
    {
        table.apply(&RouteNetlinkMessage::NewAddress(m));
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                msg = messages.next() => {
                    let Some((msg, _)) = msg else { break };
                    if let NetlinkPayload::InnerMessage(inner) = msg.payload {
                        if table.apply(&inner) && !report(&mut table, &commands) {
                            return;
                        }
                    }
                }
                paths = rx.recv() => {
                    let Some(paths) = paths else { return };
                    table.set_paths(paths);
                    if !report(&mut table, &commands) {
                        return;
                    }
                }
            }
        }
        warn!("netlink event stream ended; carrier loss is now detected by BFD only");
    });
    Ok(LinkWatch { paths: tx })
}

/// Sends the changed verdicts; false when the BFD thread is gone.
fn report(table: &mut LinkTable, commands: &CommandLink) -> bool {
    for (path, up) in table.changes() {
        if up {
            info!(path = table.name(path), "underlay link up");
        } else {
            warn!(
                path = table.name(path),
                "underlay link down (carrier or address lost)"
            );
        }
        if !commands.send(Command::Link { path, up }) {
            debug!("BFD thread gone; link watch stops");
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths() -> Vec<WatchedPath> {
        vec![
            WatchedPath {
                id: PathId(0),
                name: "p1".into(),
                interface: Some("veth1".into()),
                local: "198.18.21.1".parse().unwrap(),
            },
            WatchedPath {
                id: PathId(1),
                name: "p2".into(),
                interface: None,
                local: "2001:2::1".parse().unwrap(),
            },
        ]
    }

    fn table() -> LinkTable {
        let mut t = LinkTable::new(paths());
        t.set_link(5, Some("veth1".into()), true);
        t.set_link(6, Some("veth2".into()), true);
        t.set_address(5, "198.18.21.1".parse().unwrap(), true);
        t.set_address(6, "2001:2::1".parse().unwrap(), true);
        t
    }

    #[test]
    fn first_report_only_names_down_paths() {
        let mut t = table();
        assert_eq!(t.changes(), vec![]);
        let mut t = table();
        t.set_link(6, None, false);
        assert_eq!(t.changes(), vec![(PathId(1), false)]);
        assert_eq!(t.changes(), vec![]);
    }

    #[test]
    fn carrier_loss_on_the_named_interface() {
        let mut t = table();
        t.changes();
        t.set_link(5, None, false);
        assert_eq!(t.changes(), vec![(PathId(0), false)]);
        t.set_link(5, None, true);
        assert_eq!(t.changes(), vec![(PathId(0), true)]);
    }

    #[test]
    fn interface_found_by_its_address() {
        let mut t = table();
        t.changes();
        // Path 2 has no interface key: veth2 holds its address.
        t.set_link(6, None, false);
        assert_eq!(t.changes(), vec![(PathId(1), false)]);
        t.set_link(6, None, true);
        assert_eq!(t.changes(), vec![(PathId(1), true)]);
    }

    #[test]
    fn address_loss_and_link_removal() {
        let mut t = table();
        t.changes();
        t.set_address(6, "2001:2::1".parse().unwrap(), false);
        assert_eq!(t.changes(), vec![(PathId(1), false)]);
        t.remove_link(5);
        assert_eq!(t.changes(), vec![(PathId(0), false)]);
        // Unrelated links and addresses change nothing.
        t.set_link(9, Some("other".into()), false);
        t.set_address(9, "198.18.99.9".parse().unwrap(), true);
        assert_eq!(t.changes(), vec![]);
    }

    #[test]
    fn new_paths_keep_or_get_their_verdict() {
        let mut t = table();
        t.set_link(6, None, false);
        assert_eq!(t.changes(), vec![(PathId(1), false)]);
        // A reload keeps path 1 and adds path 7 on the down veth2.
        let mut paths = paths();
        paths.push(WatchedPath {
            id: PathId(7),
            name: "p3".into(),
            interface: Some("veth2".into()),
            local: "2001:2::1".parse().unwrap(),
        });
        t.set_paths(paths);
        assert_eq!(t.changes(), vec![(PathId(7), false)]);
        t.set_link(6, None, true);
        assert_eq!(t.changes(), vec![(PathId(1), true), (PathId(7), true)]);
    }

    #[test]
    fn parses_link_messages() {
        let mut m = LinkMessage::default();
        m.header.index = 5;
        m.header.flags = LinkFlags::Up;
        m.attributes.push(LinkAttribute::IfName("veth1".into()));
        let mut t = table();
        t.changes();
        // Up without carrier (IFF_LOWER_UP clear) is down.
        assert!(t.apply(&RouteNetlinkMessage::NewLink(m.clone())));
        assert_eq!(t.changes(), vec![(PathId(0), false)]);
        m.header.flags = LinkFlags::Up | LinkFlags::LowerUp;
        t.apply(&RouteNetlinkMessage::NewLink(m));
        assert_eq!(t.changes(), vec![(PathId(0), true)]);
    }
}

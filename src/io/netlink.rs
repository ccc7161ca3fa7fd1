//! Addresses and routes on the TUN devices, through rtnetlink. Routes go
//! away with their device, so a clean stop needs no route deletion; a
//! reload that changes a peer's `routes` adds and deletes them in place.

use crate::config::Prefix;
use rtnetlink::packet_route::route::RouteMessage;
use rtnetlink::{Handle, RouteMessageBuilder};
use std::io;
use std::net::IpAddr;

/// A netlink connection driven by the tokio runtime.
pub struct Netlink {
    handle: Handle,
}

fn nl_err(what: String) -> impl FnOnce(rtnetlink::Error) -> io::Error {
    move |e| io::Error::other(format!("{what}: {e}"))
}

impl Netlink {
    pub fn connect() -> io::Result<Netlink> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// Adds `prefix` as an address of interface `ifindex` (existing is fine).
    pub async fn add_address(&self, ifindex: u32, prefix: &Prefix) -> io::Result<()> {
        let r = self
            .handle
            .address()
            .add(ifindex, prefix.addr, prefix.len)
            .replace()
            .execute()
            .await;
        r.map_err(nl_err(format!("adding address {prefix}")))
    }

    /// Routes `prefix` into interface `ifindex` with `metric` (replacing
    /// an older route with the same metric).
    pub async fn add_route(
        &self,
        ifindex: u32,
        prefix: &Prefix,
        metric: Option<u32>,
    ) -> io::Result<()> {
        let msg = route_message(ifindex, prefix, metric)?;
        let request = self.handle.route().add(msg).replace();
        request
            .execute()
            .await
            .map_err(nl_err(format!("adding route {prefix}")))
    }

    /// Removes the route to `prefix` via interface `ifindex`.
    pub async fn del_route(
        &self,
        ifindex: u32,
        prefix: &Prefix,
        metric: Option<u32>,
    ) -> io::Result<()> {
        let msg = route_message(ifindex, prefix, metric)?;
        self.handle
            .route()
            .del(msg)
            .execute()
            .await
            .map_err(nl_err(format!("deleting route {prefix}")))
    }
}

/// The route to `prefix` out of interface `ifindex`, with an optional metric.
fn route_message(ifindex: u32, prefix: &Prefix, metric: Option<u32>) -> io::Result<RouteMessage> {
    let mut builder = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(prefix.addr, prefix.len)
        .map_err(|e| io::Error::other(format!("route {prefix}: {e}")))?
        .output_interface(ifindex);
    if let Some(m) = metric {
        builder = builder.priority(m);
    }
    Ok(builder.build())
}

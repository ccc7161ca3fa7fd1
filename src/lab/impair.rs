//! Faults on a path, injected on gateway A: a blackhole and one-way drops
//! with nftables (the carrier stays up, as in a real cloud failure), random
//! loss (`numgen random`), an MTU black hole (packets above a size dropped),
//! and the carrier itself (`ip link set down`). Delay is in `relay`.

use super::*;

impl Lab {
    pub(super) fn nft_table(path: LabPath) -> String {
        format!("xl_lab_{}", path.name())
    }

    /// The table of [`Lab::drop_larger_than`], apart from the other faults'
    /// so that it combines with them.
    fn nft_big_table(path: LabPath) -> String {
        format!("xl_lab_big_{}", path.name())
    }

    /// Drops every IP packet in and out of `path`'s veth on gateway A (nftables); the
    /// link keeps its carrier, so only BFD can notice.
    pub fn blackhole(&self, path: LabPath) -> Result<()> {
        self.impair(path, &[Direction::AToB, Direction::BToA], "drop")
    }

    /// Drops the packets of `path` going one way only (filtered on gateway A); [`Lab::heal`]
    /// removes it.
    pub fn drop_one_way(&self, path: LabPath, direction: Direction) -> Result<()> {
        self.impair(path, &[direction], "drop")
    }

    /// Drops `percent` % of `path`'s packets at random in each direction (nftables
    /// `numgen random`); [`Lab::heal`] removes it. The rule sees a UDP GSO
    /// train (the daemon's batches, more of them on a busy host) as one
    /// packet and drops it whole: run the gateways with
    /// `CROSSLINK_UDP_GSO=0` when the loss must fall on datagrams one by
    /// one, as a wire's does.
    pub fn random_loss(&self, path: LabPath, percent: u8) -> Result<()> {
        let verdict = format!("numgen random mod 100 < {percent} drop");
        self.impair(path, &[Direction::AToB, Direction::BToA], &verdict)
    }

    /// Drops `per_mille` in 1000 of `path`'s packets at random in each
    /// direction (finer than [`Lab::random_loss`], with its caveat about
    /// GSO trains); [`Lab::heal`] removes it.
    pub fn loss_per_mille(&self, path: LabPath, per_mille: u16) -> Result<()> {
        let verdict = format!("numgen random mod 1000 < {per_mille} drop");
        self.impair(path, &[Direction::AToB, Direction::BToA], &verdict)
    }

    /// Replaces `path`'s impairment table on gateway A with one applying `verdict` (an
    /// nftables statement) to the packets of the given directions.
    ///
    /// With the fast path, whose BPF programs send and receive beside the
    /// netfilter hooks, the packets are dropped where the wire would lose
    /// them instead: a root queue of length 0 on the sending gateway's path
    /// device, which every packet leaving it passes (a drop only: other
    /// verdicts are refused).
    pub(super) fn impair(
        &self,
        path: LabPath,
        directions: &[Direction],
        verdict: &str,
    ) -> Result<()> {
        self.heal_impairment(path)?;
        let dev = path.name();
        let table = Self::nft_table(path);
        if self.opts.fast_path {
            if verdict != "drop" {
                return Err(LabError::Other(format!(
                    "a fast-path lab can only drop all of a path's packets, not \"{verdict}\""
                )));
            }
            // Both directions at once (two processes started together), as
            // a cut does: one after the other, the second would start the
            // far end's detection late and lengthen the outage measured.
            let mut children = Vec::new();
            for d in directions {
                let host = match d {
                    Direction::AToB => Host::GwA,
                    Direction::BToA => Host::GwB,
                };
                let child = self
                    .command_in(host, "tc")
                    .args([
                        "qdisc", "replace", "dev", dev, "root", "pfifo", "limit", "0",
                    ])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .map_err(io_err("running tc"))?;
                children.push((host, child));
            }
            for (host, child) in children {
                let out = child.wait_with_output().map_err(io_err("running tc"))?;
                if !out.status.success() {
                    return Err(LabError::Command {
                        cmd: format!(
                            "tc qdisc replace dev {dev} root pfifo limit 0 (in {})",
                            self.ns(host)
                        ),
                        status: out.status.to_string(),
                        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                    });
                }
            }
            return Ok(());
        }
        let mut script = format!("table inet {table} {{\n");
        for d in directions {
            let (chain, hook, dir) = match d {
                Direction::BToA => ("in", "prerouting", "iifname"),
                Direction::AToB => ("post", "postrouting", "oifname"),
            };
            script.push_str(&format!(
                "chain {chain} {{ type filter hook {hook} priority -300; policy accept; \
                 {dir} \"{dev}\" {verdict}; }}\n"
            ));
        }
        script.push_str("}\n");
        self.nft_script(Host::GwA, &script)
    }

    /// Loads an nftables script (`nft -f -`) in a host's namespace.
    pub fn nft_script(&self, host: Host, script: &str) -> Result<()> {
        let mut child = self
            .command_in(host, "nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io_err("running nft"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .map_err(io_err("writing the nft script"))?;
        }
        let out = child.wait_with_output().map_err(io_err("running nft"))?;
        if !out.status.success() {
            return Err(LabError::Command {
                cmd: format!("nft -f - (in {})", self.ns(host)),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }

    /// Drops the IP packets larger than `bytes` in and out of `path`'s veth
    /// on gateway A, both directions (an MTU black hole: no ICMP is sent
    /// back); [`Lab::heal`] removes it. The size is the IP packet's, header
    /// included and link header not, as `ping -s` plus 28 makes it: nftables'
    /// `ip length` (IPv4's total length), and `ip6 length` (the payload
    /// length) plus IPv6's 40-byte header. A GSO packet (the daemon's UDP
    /// GSO batches) is measured whole before it is cut into datagrams, so
    /// run the gateways with `CROSSLINK_UDP_GSO=0` when their datagrams
    /// must meet the limit one by one. Refused in a fast-path lab, whose
    /// packets pass netfilter by.
    pub fn drop_larger_than(&self, path: LabPath, bytes: u16) -> Result<()> {
        if self.opts.fast_path {
            return Err(LabError::Other(
                "a fast-path lab cannot drop large packets: its BPF programs send and \
                 receive beside netfilter"
                    .into(),
            ));
        }
        let table = Self::nft_big_table(path);
        self.delete_nft_table(Host::GwA, &table)?;
        let dev = path.name();
        let v6 = bytes.saturating_sub(40);
        let mut script = format!("table inet {table} {{\n");
        for (chain, hook, dir) in [
            ("in", "prerouting", "iifname"),
            ("post", "postrouting", "oifname"),
        ] {
            script.push_str(&format!(
                "chain {chain} {{ type filter hook {hook} priority -300; policy accept; \
                 {dir} \"{dev}\" ip length > {bytes} drop; \
                 {dir} \"{dev}\" ip6 length > {v6} drop; }}\n"
            ));
        }
        script.push_str("}\n");
        self.nft_script(Host::GwA, &script)
    }

    /// Removes every fault on `path`: the nftables faults (blackhole, one-way
    /// and random drops, the large-packet drop) and the delay relays
    /// ([`Lab::delay`]). No error if there was none.
    pub fn heal(&self, path: LabPath) -> Result<()> {
        let relays = self.remove_relays(path);
        self.heal_impairment(path)?;
        self.delete_nft_table(Host::GwA, &Self::nft_big_table(path))?;
        relays
    }

    /// Removes the impairment `impair` set (its table, or the
    /// fast path's queues), leaving the delay and the large-packet drop.
    fn heal_impairment(&self, path: LabPath) -> Result<()> {
        if self.opts.fast_path {
            for host in [Host::GwA, Host::GwB] {
                // No error when there is no such queue.
                let _ = run(self.command_in(host, "tc").args([
                    "qdisc",
                    "del",
                    "dev",
                    path.name(),
                    "root",
                ]));
            }
        }
        self.delete_nft_table(Host::GwA, &Self::nft_table(path))
    }

    /// Deletes an nftables table of the lab's (no error if there is none).
    fn delete_nft_table(&self, host: Host, table: &str) -> Result<()> {
        match run(self
            .command_in(host, "nft")
            .args(["delete", "table", "inet", table]))
        {
            Ok(_) => Ok(()),
            Err(LabError::Command { stderr, .. })
                if stderr.contains("No such file") || stderr.contains("does not exist") =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Shapes `path` to `mbit` Mbit/s each way: a token bucket (`tc tbf`)
    /// on each gateway's end, with a queue of 20 ms at that rate. Replaces
    /// any qdisc there; [`Lab::unshape`] removes it.
    pub fn shape(&self, path: LabPath, mbit: u32) -> Result<()> {
        // A burst of 1 ms at the rate (at least 32 KiB: above one GSO
        // segment run's worth of MTU packets, below a timer tick's worth).
        let burst = (u64::from(mbit) * 1_000_000 / 8 / 1000).max(32 * 1024);
        for host in [Host::GwA, Host::GwB] {
            run(self.command_in(host, "tc").args([
                "qdisc",
                "replace",
                "dev",
                path.name(),
                "root",
                "tbf",
                "rate",
                &format!("{mbit}mbit"),
                "burst",
                &burst.to_string(),
                "latency",
                "20ms",
            ]))?;
        }
        Ok(())
    }

    /// Removes [`Lab::shape`]'s token buckets.
    pub fn unshape(&self, path: LabPath) -> Result<()> {
        for host in [Host::GwA, Host::GwB] {
            let _ =
                run(self
                    .command_in(host, "tc")
                    .args(["qdisc", "del", "dev", path.name(), "root"]));
        }
        Ok(())
    }

    /// Sets `path`'s veth down on gateway A (both ends lose carrier).
    pub fn link_down(&self, path: LabPath) -> Result<()> {
        self.ip_in(Host::GwA, &["link", "set", path.name(), "down"])
            .map(drop)
    }

    pub fn link_up(&self, path: LabPath) -> Result<()> {
        self.ip_in(Host::GwA, &["link", "set", path.name(), "up"])
            .map(drop)
    }
}

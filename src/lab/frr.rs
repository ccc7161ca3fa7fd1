//! FRRouting daemons in a lab namespace: zebra, staticd, bgpd and bfdd of one
//! host, each with its own pid file, vty socket and zserv socket in a private
//! directory (never the system's /etc/frr, /run/frr or running services), fed an
//! integrated `frr.conf` through `vtysh -f`, asked with `vtysh -c`, and stopped
//! (or killed, as a dying host) by process id. bfdd runs at real-time priority
//! (`chrt -f 50`, as crosslink's BFD thread): at 10 ms x 3 a busy machine would
//! otherwise flap its sessions.

use super::*;

/// The FRR daemons, in the order they start (zebra first: the others connect to it).
pub const FRR_DAEMONS: [&str; 4] = ["zebra", "staticd", "bfdd", "bgpd"];

/// Where the FRR daemons live (Debian `frr`).
pub const FRR_DIR: &str = "/usr/lib/frr";

/// The daemons of one host in one namespace.
pub struct FrrHost {
    ns: String,
    dir: PathBuf,
    daemons: Vec<(&'static str, Child)>,
}

impl FrrHost {
    /// Starts `daemons` (names from [`FRR_DAEMONS`]) in namespace `ns`; files go to
    /// `dir` (created, mode 0777: the daemons drop privileges to user `frr`).
    pub fn start(ns: &str, dir: &Path, daemons: &[&'static str]) -> Result<FrrHost> {
        fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        run(Command::new("chmod").arg("0777").arg(dir))?;
        let mut host = FrrHost {
            ns: ns.to_string(),
            dir: dir.to_path_buf(),
            daemons: Vec::new(),
        };
        for daemon in FRR_DAEMONS.iter().filter(|d| daemons.contains(d)) {
            host.start_daemon(daemon)?;
        }
        Ok(host)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn start_daemon(&mut self, daemon: &'static str) -> Result<()> {
        let conf = self.file(&format!("{daemon}.conf"));
        fs::write(&conf, "").map_err(io_err(format!("writing {}", conf.display())))?;
        let log = fs::File::create(self.file(&format!("{daemon}.log")))
            .map_err(io_err(format!("creating the {daemon} log")))?;
        let err = log.try_clone().map_err(io_err("duplicating the log"))?;
        let dir = self.dir.display().to_string();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns]);
        if daemon == "bfdd" {
            // BFD at 10 ms x 3 on a busy host needs a real-time scheduling class,
            // as crosslink's BFD thread has (systemd: CPUSchedulingPolicy=fifo).
            cmd.args(["chrt", "-f", "50"]);
        }
        cmd.arg(format!("{FRR_DIR}/{daemon}"))
            .arg("-f")
            .arg(&conf)
            .arg("-i")
            .arg(self.file(&format!("{daemon}.pid")))
            .args(["--vty_socket", &dir, "-z", &format!("{dir}/zserv.api")])
            .args(["-P", "0", "-u", "frr", "-g", "frr", "--log", "stdout"]);
        if daemon == "bfdd" {
            cmd.arg("--bfdctl").arg(self.file("bfdd.sock"));
        }
        cmd.stdin(Stdio::null()).stdout(log).stderr(err);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .spawn()
            .map_err(io_err(format!("starting {daemon} in {}", self.ns)))?;
        self.daemons.push((daemon, child));
        let vty = self.file(&format!("{daemon}.vty"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !vty.exists() {
            if let Some((_, c)) = self.daemons.last_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    return Err(LabError::Other(format!(
                        "{daemon} in {} exited ({status}): {}",
                        self.ns,
                        self.log_tail(daemon, 10)
                    )));
                }
            }
            if Instant::now() >= deadline {
                return Err(LabError::Timeout {
                    what: format!("{daemon} vty socket in {}", self.ns),
                    after: Duration::from_secs(10),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The last `lines` lines of a daemon's log.
    pub fn log_tail(&self, daemon: &str, lines: usize) -> String {
        let text = fs::read_to_string(self.file(&format!("{daemon}.log"))).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Applies an integrated configuration (`frr.conf` text) with `vtysh -f`.
    pub fn apply(&self, config: &str) -> Result<String> {
        let file = self.file("frr.conf");
        fs::write(&file, config).map_err(io_err(format!("writing {}", file.display())))?;
        run(Command::new("ip")
            .args(["netns", "exec", &self.ns, "vtysh", "--vty_socket"])
            .arg(&self.dir)
            .arg("-f")
            .arg(&file))
    }

    /// Runs `vtysh -c CMD...` against every daemon of the host.
    pub fn vtysh(&self, cmds: &[&str]) -> Result<String> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, "vtysh", "--vty_socket"])
            .arg(&self.dir);
        for c in cmds {
            cmd.args(["-c", c]);
        }
        run(&mut cmd)
    }

    /// A `show ... json` command's answer, parsed (null when it cannot be).
    pub fn json(&self, show: &str) -> Value {
        self.vtysh(&[show])
            .ok()
            .and_then(|out| serde_json::from_str(&out).ok())
            .unwrap_or(Value::Null)
    }

    /// Fails if a daemon has exited.
    pub fn check(&mut self) -> Result<()> {
        for (daemon, child) in &mut self.daemons {
            if let Ok(Some(status)) = child.try_wait() {
                let daemon = *daemon;
                return Err(LabError::Other(format!(
                    "{daemon} in {} exited ({status}): {}",
                    self.ns,
                    self.log_tail(daemon, 10)
                )));
            }
        }
        Ok(())
    }

    /// Kills every daemon with SIGKILL at once (a host that dies: no BGP
    /// notification, no BFD AdminDown).
    pub fn kill(&mut self) {
        for (_, child) in &mut self.daemons {
            let _ = child.kill();
        }
        for (_, mut child) in self.daemons.drain(..) {
            let _ = child.wait();
        }
    }

    /// Stops every daemon: SIGTERM, SIGKILL after a grace period.
    pub fn stop(&mut self) {
        for (_, mut child) in self.daemons.drain(..).rev() {
            terminate(&mut child, Duration::from_secs(3));
        }
    }
}

impl Drop for FrrHost {
    fn drop(&mut self) {
        self.stop();
    }
}

//! Running a command under a lock: its own process group, so that stopping it stops
//! everything it started; signals passed on; SIGTERM then SIGKILL when the lock is lost.

use std::future::Future;
use std::io;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;

use crate::exit::{self, Failure};

/// SIGINT and SIGTERM, caught from the start so that an interrupted wait cleans up its key.
pub struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    pub fn install() -> Result<Signals, Failure> {
        let install =
            |kind| signal(kind).map_err(|e| Failure::new("cannot install signal handlers", &e));
        Ok(Signals {
            interrupt: install(SignalKind::interrupt())?,
            terminate: install(SignalKind::terminate())?,
        })
    }

    /// The next SIGINT or SIGTERM, as its number. Cancel safe.
    pub async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.interrupt.recv() => libc::SIGINT,
            _ = self.terminate.recv() => libc::SIGTERM,
        }
    }
}

/// Where the signals to pass on to a command come from.
pub enum Relay<'a> {
    /// Straight from the OS: the command is etcd-coord's only one.
    Os(&'a mut Signals),
    /// From etcd-coord's signal loop, shared by several commands running at once.
    Shared(watch::Receiver<Option<i32>>),
}

impl Relay<'_> {
    /// The next signal to pass on. Cancel safe.
    async fn recv(&mut self) -> i32 {
        match self {
            Relay::Os(signals) => signals.recv().await,
            Relay::Shared(rx) => loop {
                if rx.changed().await.is_err() {
                    return std::future::pending().await;
                }
                if let Some(signo) = *rx.borrow_and_update() {
                    return signo;
                }
            },
        }
    }
}

/// A running command and its process group.
pub struct Running {
    child: Child,
    /// The process group: the command's own pid, as it leads a new group.
    pgid: i32,
}

/// How a command run under a lock ended.
pub enum Ended {
    /// The command exited by itself (or after a signal we passed on).
    Exited(ExitStatus),
    /// The lock was lost first; the command was stopped.
    Lost,
}

impl Running {
    /// Starts `argv` with `env` added to etcd-coord's environment, in a new process group.
    /// stdout and stderr are shared with etcd-coord.
    pub fn spawn(
        argv: &[String],
        env: &[(&str, String)],
        stdin: Stdio,
    ) -> Result<Running, Failure> {
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| Failure::usage("the command is empty"))?;
        let mut command = Command::new(program);
        command
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(stdin)
            .kill_on_drop(true)
            // Its own group, so that stopping the job reaches whatever it forked (a shell's
            // children included). Ctrl-C at a terminal reaches etcd-coord, which passes it on.
            .process_group(0);
        #[cfg(target_os = "linux")]
        {
            let parent = std::process::id() as libc::pid_t;
            // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between fork and
            // exec, touching no memory of the parent.
            unsafe {
                command.pre_exec(move || {
                    // If etcd-coord is killed, nobody watches the lock any more: the command
                    // must not outlive it. The runtime is single-threaded, so the thread that
                    // forks (the one the kernel watches) lives as long as the process.
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    if libc::getppid() != parent {
                        libc::_exit(1);
                    }
                    Ok(())
                });
            }
        }
        let child = command.spawn().map_err(|e| {
            let code = match e.kind() {
                io::ErrorKind::NotFound => exit::NOT_FOUND,
                _ => exit::CANNOT_RUN,
            };
            Failure::new(format_args!("cannot run {program:?}"), &e).code(code)
        })?;
        let pgid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .ok_or_else(|| Failure::msg("the command exited before it could be watched"))?;
        Ok(Running { child, pgid })
    }

    /// The command's stdin, if it was piped.
    pub fn take_stdin(&mut self) -> Option<tokio::process::ChildStdin> {
        self.child.stdin.take()
    }

    /// Sends `signo` to the whole process group. A group that is already gone is fine.
    pub fn signal_group(&self, signo: i32) {
        // SAFETY: kill(2) with a negative pid signals that process group; no memory involved.
        unsafe {
            libc::kill(-self.pgid, signo);
        }
    }

    fn group_exists(&self) -> bool {
        // SAFETY: as above; signal 0 only checks for existence.
        unsafe { libc::kill(-self.pgid, 0) == 0 }
    }

    /// Waits for the command, passing SIGINT and SIGTERM on to it, unless `lost` completes
    /// first: then the group gets SIGTERM, and SIGKILL after `grace`.
    pub async fn supervise(
        mut self,
        lost: impl Future<Output = ()>,
        signals: &mut Relay<'_>,
        grace: Duration,
    ) -> Result<Ended, Failure> {
        tokio::pin!(lost);
        loop {
            tokio::select! {
                // A command that finished counts as finished, even if the loss came with it.
                biased;
                status = self.child.wait() => {
                    let status = status.map_err(|e| Failure::new("waiting for the command", &e))?;
                    return Ok(Ended::Exited(status));
                }
                _ = &mut lost => {
                    self.stop(grace).await;
                    return Ok(Ended::Lost);
                }
                signo = signals.recv() => self.signal_group(signo),
            }
        }
    }

    /// SIGTERM to the group; SIGKILL to whatever of it is left after `grace`.
    pub async fn stop(&mut self, grace: Duration) {
        self.signal_group(libc::SIGTERM);
        let deadline = tokio::time::Instant::now() + grace;
        // The leader is our child: wait for it. The rest of the group is not, so poll it.
        let _ = tokio::time::timeout_at(deadline, self.child.wait()).await;
        while self.group_exists() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.signal_group(libc::SIGKILL);
        let _ = self.child.wait().await;
    }
}

//! The flip prober of the update-latency benchmarks (`comb bench policy`, `comb bench kube`):
//! connect attempts from a lab pod's network namespace, timed from a change (a trigger the
//! caller gives: a manifest renamed into place, a PATCH to the API server) until the pod's
//! flow shows the new verdict.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrIn, connect, getsockopt, socket, sockopt,
};
use std::net::SocketAddrV4;

/// Prober: one attempt per ATTEMPT_EVERY; no answer in DENY_AFTER = dropped; the flip is
/// seen once RUN consecutive attempts agree.
const ATTEMPT_EVERY: Duration = Duration::from_millis(1);
const DENY_AFTER: Duration = Duration::from_millis(100);
const RUN: usize = 5;
pub const FLIP_TIMEOUT: Duration = Duration::from_secs(20);

/// The change whose enforcement is timed; it returns once the change is made (the file
/// renamed, the API server's answer received).
pub type Trigger = Box<dyn FnOnce() -> Result<()> + Send>;

enum Job {
    /// One connect attempt; answers whether the SYN got through.
    Once,
    /// Run `trigger` (the change), then time until the client's flow shows `want_allowed`.
    Flip {
        trigger: Trigger,
        want_allowed: bool,
    },
}

enum Answer {
    Once(bool),
    Flip(Flipped),
}

pub struct Flipped {
    /// When the trigger returned, on both clocks (the agent's log has wall-clock times).
    pub t0: Instant,
    pub t0_wall: SystemTime,
    /// Start of the first attempt of the run that saw the new verdict.
    pub seen: Instant,
}

pub struct Prober {
    jobs: Option<mpsc::Sender<Job>>,
    answers: mpsc::Receiver<Result<Answer>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Prober {
    /// A thread that joins network namespace `netns` (a lab pod's) and connects to `to`.
    pub fn start(netns: &str, to: SocketAddrV4) -> Result<Prober> {
        // The lab's namespaces are `ip netns` names.
        let path = Path::new("/run/netns").join(netns);
        let fd = std::fs::File::open(&path)
            .with_context(|| format!("opening network namespace {}", path.display()))?;
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let (answer_tx, answers) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("policy-prober".into())
            .spawn(move || {
                // This thread only: the rest of the process stays where it is.
                let r = nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET);
                let _ = ready_tx.send(r.map_err(anyhow::Error::from));
                if r.is_err() {
                    return;
                }
                let to = SockaddrIn::from(to);
                for job in job_rx {
                    let a = match job {
                        Job::Once => probe_once(&to).map(Answer::Once),
                        Job::Flip {
                            trigger,
                            want_allowed,
                        } => probe_flip(&to, trigger, want_allowed).map(Answer::Flip),
                    };
                    if answer_tx.send(a).is_err() {
                        return;
                    }
                }
            })?;
        ready_rx
            .recv()
            .context("prober thread")?
            .context("setns into the client pod")?;
        Ok(Prober {
            jobs: Some(jobs),
            answers,
            thread: Some(thread),
        })
    }

    fn ask(&self, job: Job) -> Result<Answer> {
        self.jobs
            .as_ref()
            .context("prober stopped")?
            .send(job)
            .ok()
            .context("prober thread gone")?;
        self.answers.recv().context("prober thread gone")?
    }

    pub fn once(&self) -> Result<bool> {
        match self.ask(Job::Once)? {
            Answer::Once(b) => Ok(b),
            Answer::Flip(..) => bail!("prober: unexpected answer"),
        }
    }

    pub fn flip(&self, trigger: Trigger, want_allowed: bool) -> Result<Flipped> {
        match self.ask(Job::Flip {
            trigger,
            want_allowed,
        })? {
            Answer::Flip(f) => Ok(f),
            Answer::Once(_) => bail!("prober: unexpected answer"),
        }
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A non-blocking connect in flight.
struct Attempt {
    start: Instant,
    fd: Option<OwnedFd>,
    /// Some(true): the SYN got through (connected, or refused by the server's stack).
    result: Option<bool>,
}

impl Attempt {
    fn start(to: &SockaddrIn) -> Result<Attempt> {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let start = Instant::now();
        let result = match connect(fd.as_raw_fd(), to) {
            Ok(()) => Some(true),
            Err(Errno::EINPROGRESS) => None,
            Err(e) => bail!("connect to {to}: {e}"),
        };
        Ok(Attempt {
            start,
            fd: (result.is_none()).then_some(fd),
            result,
        })
    }

    /// Finish it if its connect completed.
    fn poll(&mut self, to: &SockaddrIn) -> Result<()> {
        let Some(fd) = &self.fd else { return Ok(()) };
        let err = getsockopt(fd, sockopt::SocketError)?;
        let result = if err == Errno::ECONNREFUSED as i32 {
            Some(true)
        } else if err != 0 {
            bail!("connect to {to}: {}", Errno::from_raw(err));
        } else {
            match connect(fd.as_raw_fd(), to) {
                Ok(()) | Err(Errno::EISCONN) => Some(true),
                Err(Errno::EALREADY | Errno::EINPROGRESS) => None,
                Err(Errno::ECONNREFUSED) => Some(true),
                Err(e) => bail!("connect to {to}: {e}"),
            }
        };
        if result.is_some() {
            self.result = result;
            self.fd = None; // closes it
        }
        Ok(())
    }
}

/// Wait up to `timeout` for any attempt in flight to complete (one poll(2) for all), then
/// finish the completed ones and count those older than DENY_AFTER as dropped.
fn wait_attempts<'a>(
    attempts: impl Iterator<Item = &'a mut Attempt>,
    to: &SockaddrIn,
    timeout: Duration,
) -> Result<()> {
    let mut pending: Vec<&mut Attempt> = attempts.filter(|a| a.fd.is_some()).collect();
    let mut fds: Vec<libc::pollfd> = pending
        .iter()
        .filter_map(|a| a.fd.as_ref())
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_micros().div_ceil(1000).min(1000) as libc::c_int;
    // The descriptors stay open (owned by `pending`) until it returns.
    let n = crate::sys::poll(&mut fds, ms);
    if n < 0 && Errno::last() != Errno::EINTR {
        bail!("poll: {}", Errno::last());
    }
    for (a, p) in pending.iter_mut().zip(&fds) {
        if p.revents != 0 {
            a.poll(to)?;
        }
        if a.result.is_none() && a.start.elapsed() >= DENY_AFTER {
            a.result = Some(false);
            a.fd = None;
        }
    }
    Ok(())
}

fn probe_once(to: &SockaddrIn) -> Result<bool> {
    let mut a = Attempt::start(to)?;
    while a.result.is_none() {
        wait_attempts(std::iter::once(&mut a), to, DENY_AFTER)?;
    }
    Ok(a.result == Some(true))
}

/// Trigger the change, then start an attempt every ATTEMPT_EVERY; judge them in start order; the flip is
/// the start of the first attempt of RUN consecutive ones that show `want`.
fn probe_flip(to: &SockaddrIn, trigger: Trigger, want: bool) -> Result<Flipped> {
    trigger()?;
    let (t0, t0_wall) = (Instant::now(), SystemTime::now());
    let mut inflight: VecDeque<Attempt> = VecDeque::new();
    let (mut run_start, mut run) = (None, 0usize);
    let mut due = t0;
    loop {
        let now = Instant::now();
        if now.duration_since(t0) > FLIP_TIMEOUT {
            bail!(
                "the client's flow to {to} did not become {} within {FLIP_TIMEOUT:?} of the change",
                if want { "allowed" } else { "denied" }
            );
        }
        if now >= due {
            inflight.push_back(Attempt::start(to)?);
            // Late (descheduled): carry on from now rather than catch up in a burst.
            due = if now > due + ATTEMPT_EVERY {
                now + ATTEMPT_EVERY
            } else {
                due + ATTEMPT_EVERY
            };
        }
        wait_attempts(inflight.iter_mut(), to, due.saturating_duration_since(now))?;
        while let Some(result) = inflight.front().and_then(|a| a.result) {
            let a = inflight.pop_front().expect("front exists");
            if result == want {
                run_start.get_or_insert(a.start);
                run += 1;
                if run >= RUN {
                    return Ok(Flipped {
                        t0,
                        t0_wall,
                        seen: run_start.expect("set above"),
                    });
                }
            } else {
                (run_start, run) = (None, 0);
            }
        }
    }
}

/// The server the prober connects to: `comb probe serve --mode echo` on `port` in `pod` (the
/// prober counts a refused SYN as allowed too; a listener makes "allowed" unambiguous).
pub fn start_server(lab: &comb_lab::Lab, pod: &str, port: u16) -> Result<super::tools::Server> {
    let comb = std::env::current_exe()?;
    super::tools::start_server(
        lab,
        pod,
        comb.to_str().context("comb path")?,
        &[
            "probe",
            "serve",
            "--port",
            &port.to_string(),
            "--mode",
            "echo",
        ],
        port,
    )
}

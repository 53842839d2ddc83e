//! The idle reaper of a connection pool (HTTP/1 upstream, HBONE outbound): one task per
//! pool, holding it weakly, that asks it every quarter of its idle timeout (50 ms–5 s) to
//! drop what expired, and ends with the pool.

use std::sync::Weak;
use std::time::{Duration, Instant};

fn period(idle: Duration) -> Duration {
    (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(5))
}

/// Spawns the reaper on the current runtime; `reap(pool, now)` drops what expired.
pub(crate) fn spawn<T: Send + Sync + 'static>(
    pool: Weak<T>,
    idle: Duration,
    reap: fn(&T, Instant),
) {
    let period = period(idle);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(period).await;
            let Some(p) = pool.upgrade() else { return };
            reap(&p, Instant::now());
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quarter_of_the_idle_timeout_within_bounds() {
        assert_eq!(period(Duration::from_secs(60)), Duration::from_secs(5));
        assert_eq!(period(Duration::from_secs(8)), Duration::from_secs(2));
        assert_eq!(
            period(Duration::from_millis(100)),
            Duration::from_millis(50)
        );
    }
}

//! Saying what an object store is doing. object_store retries a failing request quietly for up
//! to [`crate::store::STORE_RETRY_TIMEOUT`], so an outage of S3 (or GCS, Azure) would be seen
//! by no one until a call gives up. [`WatchedConnector`] sits between object_store and its HTTP
//! client and sees every request: once the store has answered nothing but connection errors
//! and 5xx for [`OUTAGE_WARN_AFTER`], one WARN line says so (which store, since when,
//! retrying); the first answer after that is one INFO line with the outage's length.
//! [`Outage`] is the pure bookkeeping (it takes `now`); the connector logs what it says.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use object_store::ClientOptions;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpRequest, HttpResponse, HttpService, ReqwestConnector,
};

/// How long a store must fail every request before the outage is told.
pub const OUTAGE_WARN_AFTER: Duration = Duration::from_secs(15);

/// What the bookkeeping says to tell a person.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Tell {
    /// Nothing (no outage, or one already told or too short to tell).
    Nothing,
    /// The store has failed every request since `since` (`for_` ago): told once per outage.
    Down {
        /// When the earliest failed request of the outage was sent (wall clock).
        since: SystemTime,
        /// How long it has lasted.
        for_: Duration,
    },
    /// The store answers again after an outage that was told, which lasted this long.
    Back {
        /// The outage's length.
        lasted: Duration,
    },
}

/// One store's run of failed requests.
#[derive(Debug, Default)]
pub struct Outage {
    /// The first failure of the current run (monotonic and wall clock).
    since: Option<(Instant, SystemTime)>,
    /// The current run was told.
    told: bool,
}

impl Outage {
    /// A request sent at `sent` (`sent_wall` on the wall clock) failed (no connection, a
    /// connection cut, a timeout, a 5xx) at `now`. The outage runs from the earliest failed
    /// request's sending, not its failure: against a store that accepts connections and never
    /// answers, a request fails only when its timeout ends, half a minute or more later.
    pub fn failed(&mut self, sent: Instant, sent_wall: SystemTime, now: Instant) -> Tell {
        let run = self.since.get_or_insert((sent, sent_wall));
        if sent < run.0 {
            *run = (sent, sent_wall);
        }
        let (at, since) = *run;
        let for_ = now.saturating_duration_since(at);
        if !self.told && for_ >= OUTAGE_WARN_AFTER {
            self.told = true;
            return Tell::Down { since, for_ };
        }
        Tell::Nothing
    }

    /// The store answered (any status below 500) at `now`.
    pub fn answered(&mut self, now: Instant) -> Tell {
        let run = self.since.take();
        let told = std::mem::take(&mut self.told);
        match run {
            Some((at, _)) if told => Tell::Back { lasted: now.saturating_duration_since(at) },
            _ => Tell::Nothing,
        }
    }
}

/// object_store's usual HTTP client (reqwest), watched: every request's outcome goes to the
/// store's [`Outage`], and what it says is logged with the store's URL.
#[derive(Debug)]
pub struct WatchedConnector {
    url: String,
    outage: Arc<Mutex<Outage>>,
}

impl WatchedConnector {
    /// A connector for the store at `url` (named in the log lines).
    pub fn new(url: &str) -> Self {
        WatchedConnector { url: url.to_owned(), outage: Arc::default() }
    }
}

impl HttpConnector for WatchedConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(Watched { inner, url: self.url.clone(), outage: self.outage.clone() }))
    }
}

#[derive(Debug)]
struct Watched {
    inner: HttpClient,
    url: String,
    outage: Arc<Mutex<Outage>>,
}

#[async_trait::async_trait]
impl HttpService for Watched {
    async fn call(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let (sent, sent_wall) = (Instant::now(), SystemTime::now());
        let result = self.inner.execute(request).await;
        let failed = match &result {
            Ok(response) => response.status().is_server_error(),
            Err(_) => true,
        };
        let tell = {
            let mut outage = self.outage.lock().expect("outage");
            if failed { outage.failed(sent, sent_wall, Instant::now()) } else { outage.answered(Instant::now()) }
        };
        match tell {
            Tell::Nothing => {}
            Tell::Down { since, for_ } => tracing::warn!(
                store = %self.url,
                since = %humantime::format_rfc3339_seconds(since),
                down_s = for_.as_secs(),
                "the object store has answered nothing but errors for {} s; retrying (each call for up to {} s)",
                for_.as_secs(),
                crate::store::retry_timeout().as_secs()
            ),
            Tell::Back { lasted } => tracing::info!(
                store = %self.url,
                outage_s = lasted.as_secs(),
                "the object store answers again after an outage of {} s",
                lasted.as_secs()
            ),
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An outage is told once when it has lasted 15 s, however many requests fail, and once
    /// when it ends, with its length; a short one (retried away within 15 s) is not told at all.
    #[test]
    fn an_outage_is_told_once_after_fifteen_seconds_and_once_when_it_ends() {
        let (t0, wall) = (Instant::now(), SystemTime::now());
        let at = |s: u64| t0 + Duration::from_millis(s);
        let mut outage = Outage::default();
        assert_eq!(outage.answered(at(0)), Tell::Nothing);
        // A blip of 14.9 s: nothing to tell.
        for ms in (0..=14_900).step_by(100) {
            assert_eq!(outage.failed(at(ms), wall, at(ms)), Tell::Nothing, "{ms}");
        }
        assert_eq!(outage.answered(at(15_000)), Tell::Nothing);
        // 90 s of failures from 20 s on: told at 35 s, once.
        let mut told = Vec::new();
        for ms in (20_000..=110_000).step_by(250) {
            let tell = outage.failed(at(ms), wall, at(ms));
            if tell != Tell::Nothing {
                told.push((ms, tell));
            }
        }
        assert_eq!(told, vec![(35_000, Tell::Down { since: wall, for_: Duration::from_secs(15) })]);
        assert_eq!(outage.answered(at(110_500)), Tell::Back { lasted: Duration::from_millis(90_500) });
        assert_eq!(outage.answered(at(111_000)), Tell::Nothing, "told once");
        // The next outage is told again.
        outage.failed(at(200_000), wall, at(200_000));
        assert!(matches!(outage.failed(at(215_000), wall, at(215_000)), Tell::Down { .. }));
    }

    /// Against a store that accepts and never answers, each request fails only at its timeout:
    /// the outage is dated from the first one's sending, and told at its first failure when
    /// that is already 15 s on, with its whole length.
    #[test]
    fn an_outage_of_hanging_requests_runs_from_the_first_ones_sending() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let wall = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(1_000 + s);
        let mut outage = Outage::default();
        // Requests sent at 10 s and at 5 s (concurrently) time out at 40 s and 45 s.
        assert_eq!(
            outage.failed(at(10), wall(10), at(40)),
            Tell::Down { since: wall(10), for_: Duration::from_secs(30) }
        );
        assert_eq!(outage.failed(at(5), wall(5), at(45)), Tell::Nothing, "told once");
        assert_eq!(outage.answered(at(60)), Tell::Back { lasted: Duration::from_secs(55) });
    }
}

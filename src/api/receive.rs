//! Receive slots: at most `ingest.max_concurrent_requests` requests are being
//! received and decoded at once, because each holds its message, then its decoded
//! arrays, in memory outside the byte budget. A write gives its slot back as soon
//! as its batch holds a reservation in the budget (which then bounds its memory),
//! so requests that wait for a group commit's `fdatasync` no longer keep others
//! from being received: the slots bound memory, not durability waits.
//!
//! A request waits for a slot at most [`SLOT_WAIT`], then is answered
//! RESOURCE_EXHAUSTED with a retry hint, unread. The bound is what keeps HTTP/2
//! flow control from deadlocking: a waiting request's body arrives anyway, up to
//! its stream window, and sits unread in the connection window. Enough waiters on
//! one connection fill that window, and the requests holding the slots can then
//! never receive the rest of their messages. Answering a waiter drops its body,
//! which gives its share of the connection window back.
//!
//! A write that the ingest memory budget could not admit is refused here too,
//! before it is read ([`BudgetGate`]): otherwise it is received, decoded,
//! validated (an index lookup per experiment) and encoded for the WAL, only to
//! be refused at its reservation. With a million experiments, publication
//! drained the budget slowly, and the tokio workers spent about a core
//! receiving and refusing retries, the cores the fold and the publishers needed
//! to drain it.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use prometheus_client::metrics::counter::Counter;

use crate::config::WhenFull;
use crate::ingest::{IngestError, MemoryBudget, RETRY_AFTER};
use crate::proto::model_store_server;

/// The longest a request waits for a receive slot. Slots turn over within
/// milliseconds while the daemon keeps up (a slot is held while a message is
/// received and decoded, and at most the `when_full` wait for the budget); a
/// request that waits longer meets a saturated daemon, or one whose waiters
/// starve the slot holders of flow-control window (see the module docs).
pub const SLOT_WAIT: Duration = Duration::from_secs(1);

/// The slot a request holds; in the request's extensions for its handler.
#[derive(Debug, Clone, Default)]
pub struct ReceiveSlot(Option<Arc<Mutex<Option<OwnedSemaphorePermit>>>>);

impl ReceiveSlot {
    /// Gives the slot back (once; later calls do nothing). Otherwise it is given
    /// back when the response is ready.
    pub fn release(&self) {
        if let Some(slot) = &self.0
            && let Ok(mut permit) = slot.lock()
        {
            permit.take();
        }
    }

    /// The request's slot, or none (a request that came in some other way).
    pub fn of<T>(req: &tonic::Request<T>) -> Self {
        req.extensions().get::<Self>().cloned().unwrap_or_default()
    }
}

/// The ModelStore methods whose requests take a share of the ingest memory budget.
const BUDGETED: [&str; 2] = ["LogMetrics", "LogEvent"];

/// Whether a request to `path` (`/<service>/<method>`) takes a share of the budget.
fn budgeted(path: &str) -> bool {
    path.strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .is_some_and(|(service, method)| {
            service == model_store_server::SERVICE_NAME && BUDGETED.contains(&method)
        })
}

/// Refuses, unread, a write the ingest memory budget has no room for: one that
/// finds less room than recent writes reserved, once `when_full` has passed
/// without enough being released. The answer is the one the write would have
/// had at its reservation. It is a guess, not a reservation: a write let
/// through may still be refused at its reservation, as before, and one refused
/// here meets a budget that recent writes would not have fitted in.
#[derive(Debug, Clone)]
pub struct BudgetGate {
    pub budget: Arc<MemoryBudget>,
    pub when_full: WhenFull,
    /// Counts the writes refused here.
    pub refused: Counter,
}

impl BudgetGate {
    /// Whether a request to `path` may go on to be read.
    async fn admits(&self, path: &str) -> bool {
        if !budgeted(path) || self.budget.wait_for_room(self.when_full).await {
            return true;
        }
        self.refused.inc();
        false
    }
}

/// The answer to a write refused by [`BudgetGate`].
fn budget_full() -> tonic::Status {
    super::ApiError::from(IngestError::Full {
        what: "memory budget",
        retry_after: RETRY_AFTER,
    })
    .into()
}

/// The tower layer that hands out [`ReceiveSlot`]s.
#[derive(Debug, Clone)]
pub struct ReceiveLimitLayer {
    slots: Arc<Semaphore>,
    wait: Duration,
    gate: Option<BudgetGate>,
}

impl ReceiveLimitLayer {
    /// `max` slots; a request waits at most `wait` for one.
    pub fn new(max: usize, wait: Duration) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max)),
            wait,
            gate: None,
        }
    }

    /// Refuses writes the budget has no room for before they are read.
    pub fn with_gate(self, gate: BudgetGate) -> Self {
        Self {
            gate: Some(gate),
            ..self
        }
    }
}

impl<S> tower::Layer<S> for ReceiveLimitLayer {
    type Service = ReceiveLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ReceiveLimit {
            inner,
            slots: Arc::clone(&self.slots),
            wait: self.wait,
            gate: self.gate.clone(),
        }
    }
}

/// See [`ReceiveLimitLayer`].
#[derive(Debug, Clone)]
pub struct ReceiveLimit<S> {
    inner: S,
    slots: Arc<Semaphore>,
    wait: Duration,
    gate: Option<BudgetGate>,
}

/// The answer to a request that found no slot within the wait.
fn refused(wait: Duration) -> tonic::Status {
    super::status::retry_later(
        format!(
            "mboxd is busy: every receive slot stayed taken for {wait:?} (the memory \
             budget for requests being received); retry after {RETRY_AFTER:?}"
        ),
        RETRY_AFTER,
    )
}

impl<S, B, R> tower::Service<http::Request<B>> for ReceiveLimit<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
    R: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The clone that was made ready serves this call; a fresh clone waits for
        // the next one (tower's usual hand-over).
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        let slots = Arc::clone(&self.slots);
        let wait = self.wait;
        let gate = self.gate.clone();
        Box::pin(async move {
            // The semaphore is never closed, so only the wait can end without one.
            let Ok(permit) = tokio::time::timeout(wait, slots.acquire_owned()).await else {
                // Dropping `req` unread releases its flow-control window.
                return Ok(refused(wait).into_http());
            };
            if let Some(gate) = gate
                && !gate.admits(req.uri().path()).await
            {
                return Ok(budget_full().into_http());
            }
            let permit = permit.ok();
            let slot = ReceiveSlot(Some(Arc::new(Mutex::new(permit))));
            req.extensions_mut().insert(slot.clone());
            let response = inner.call(req).await;
            slot.release();
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_released_slot_admits_the_next_request_before_the_first_completes() {
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let wait = Arc::new(tokio::sync::Mutex::new(Some(wait)));
        let service = tower::service_fn(move |req: http::Request<bool>| {
            let wait = Arc::clone(&wait);
            async move {
                let slot = req.extensions().get::<ReceiveSlot>().cloned();
                if *req.body() {
                    // The first request gives its slot back, then waits.
                    slot.expect("a slot").release();
                    if let Some(wait) = wait.lock().await.take() {
                        let _ = wait.await;
                    }
                }
                Ok::<_, std::convert::Infallible>(http::Response::new(()))
            }
        });
        let mut svc = tower::Layer::layer(&ReceiveLimitLayer::new(1, SLOT_WAIT), service);
        let first = tower::Service::call(&mut svc, http::Request::new(true));
        let first = tokio::spawn(first);
        tokio::task::yield_now().await;
        let second = tower::Service::call(&mut svc, http::Request::new(false));
        tokio::time::timeout(std::time::Duration::from_secs(5), second)
            .await
            .expect("the second request was admitted")
            .expect("served");
        let _ = go.send(());
        first.await.expect("joined").expect("served");
    }

    type Answer = Result<http::Response<()>, std::convert::Infallible>;

    /// A first request that takes the only slot and is never answered (its task),
    /// and the call of a second request, made once the first holds the slot.
    async fn behind_a_held_slot(
        wait: Duration,
    ) -> (
        tokio::task::JoinHandle<Answer>,
        Pin<Box<dyn Future<Output = Answer> + Send>>,
    ) {
        let service = tower::service_fn(|req: http::Request<bool>| async move {
            if *req.body() {
                tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
            }
            Ok(http::Response::new(()))
        });
        let mut svc = tower::Layer::layer(&ReceiveLimitLayer::new(1, wait), service);
        let first = tokio::spawn(tower::Service::call(&mut svc, http::Request::new(true)));
        tokio::task::yield_now().await;
        (
            first,
            tower::Service::call(&mut svc, http::Request::new(false)),
        )
    }

    #[tokio::test]
    async fn a_held_slot_keeps_the_next_request_waiting() {
        let (first, second) = behind_a_held_slot(SLOT_WAIT).await;
        let waited = tokio::time::timeout(std::time::Duration::from_millis(200), second).await;
        assert!(waited.is_err(), "the second request must wait for the slot");
        first.abort();
    }

    #[tokio::test]
    async fn a_request_that_waits_too_long_is_refused_with_a_retry_hint() {
        let (first, second) = behind_a_held_slot(Duration::from_millis(50)).await;
        let response = tokio::time::timeout(std::time::Duration::from_secs(5), second)
            .await
            .expect("the wait is bounded")
            .expect("answered");
        let status = tonic::Status::from_header_map(response.headers()).expect("a gRPC status");
        assert_retry_later(&status, "receive slot");
        first.abort();
    }

    /// `status` is RESOURCE_EXHAUSTED saying `why`, with a 200 ms retry hint.
    fn assert_retry_later(status: &tonic::Status, why: &str) {
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains(why), "{}", status.message());
        assert_eq!(
            status
                .metadata()
                .get("grpc-retry-pushback-ms")
                .map(|v| v.as_bytes()),
            Some(&b"200"[..])
        );
    }

    /// A request to `path` through a gate on `budget` that waits up to `wait`;
    /// the answer's gRPC status (none for a success), and whether the service
    /// behind was called.
    async fn through_gate(
        budget: &Arc<MemoryBudget>,
        wait: Duration,
        path: &str,
    ) -> (Option<tonic::Status>, bool) {
        let called = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let service = tower::service_fn({
            let called = Arc::clone(&called);
            move |_: http::Request<()>| {
                called.store(true, std::sync::atomic::Ordering::SeqCst);
                async { Ok::<_, std::convert::Infallible>(http::Response::new(())) }
            }
        });
        let gate = BudgetGate {
            budget: Arc::clone(budget),
            when_full: WhenFull::Wait(wait),
            refused: Counter::default(),
        };
        let layer = ReceiveLimitLayer::new(4, SLOT_WAIT).with_gate(gate.clone());
        let mut svc = tower::Layer::layer(&layer, service);
        let req = http::Request::builder()
            .uri(path)
            .body(())
            .expect("a request");
        let response = tower::Service::call(&mut svc, req).await.expect("answered");
        let status = tonic::Status::from_header_map(response.headers());
        assert_eq!(gate.refused.get(), u64::from(status.is_some()));
        (status, called.load(std::sync::atomic::Ordering::SeqCst))
    }

    #[tokio::test]
    async fn a_write_the_budget_has_no_room_for_is_refused_unread() {
        const WRITE: &str = "/modelbox.ModelStore/LogMetrics";
        let budget = MemoryBudget::new(1_000);
        // Recent writes were each larger than the whole budget, which an empty
        // budget admits: so does the gate.
        for _ in 0..64 {
            drop(budget.try_reserve(2_000).expect("an empty budget admits"));
        }
        assert!(through_gate(&budget, Duration::ZERO, WRITE).await.1);
        // Recent writes reserved 600 bytes each.
        for _ in 0..64 {
            drop(budget.try_reserve(600).expect("room"));
        }
        let held = budget.try_reserve(600).expect("room");
        // 400 bytes left: a write like the recent ones would not fit.
        let (status, called) = through_gate(&budget, Duration::ZERO, WRITE).await;
        assert!(!called, "a refused write is not read");
        assert_retry_later(&status.expect("refused"), "memory budget");
        let (status, called) =
            through_gate(&budget, Duration::ZERO, "/modelbox.ModelStore/LogEvent").await;
        assert!(status.is_some() && !called, "LogEvent is gated too");
        // Reads take nothing from the budget and pass, as do other services'
        // methods of the same name.
        for path in [
            "/modelbox.ModelStore/GetMetrics",
            "/grpc.health.v1.Health/LogMetrics",
        ] {
            let (status, called) = through_gate(&budget, Duration::ZERO, path).await;
            assert!(status.is_none() && called, "{path}");
        }
        // A write waiting at the gate goes on once enough is released.
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(held);
        });
        let (status, called) = through_gate(&budget, Duration::from_secs(10), WRITE).await;
        assert!(status.is_none() && called);
        release.await.expect("released");
    }
}

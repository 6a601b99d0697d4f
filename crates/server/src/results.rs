//! The server's memory for results in flight: every execution's output is bounded before
//! it runs, and the server as a whole holds at most a budget of it (file downloads draw on
//! the same budget; request bodies have one of their own, `AppState::bodies`).
//!
//! A request's output limits are cut so that all of its streams together (a batch's
//! members included) stay within the per-response cap; then the request reserves that
//! much (twice over: the bytes and their copy while the worker's message is decoded) from
//! the server-wide budget, waiting while it is spent, and holds it until its response
//! has been sent or dropped. Output stays bytes until sent (`result_json`), so this bounds
//! what results cost the server, whatever the clients do.

use std::sync::Arc;

use forkvm_protocol::exec::ExecRequest;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;

/// The budget is counted in KiB (a semaphore takes at most `u32::MAX` permits at once).
const UNIT: u64 = 1024;

/// Reserved per stream beyond its output limit: the result's other fields and framing.
const OVERHEAD_BYTES: u64 = 4096;

/// The budget for results in flight.
pub struct ResultBudget {
    units: Arc<Semaphore>,
    total_units: u64,
    max_response_bytes: u64,
}

/// A share of the budget, held until the response is sent.
pub type Reservation = OwnedSemaphorePermit;

impl ResultBudget {
    pub fn new(budget_bytes: u64, max_response_bytes: u64) -> ResultBudget {
        let total_units = (budget_bytes / UNIT).clamp(1, u32::MAX as u64);
        ResultBudget {
            units: Arc::new(Semaphore::new(total_units as usize)),
            total_units,
            max_response_bytes: max_response_bytes.max(2 * UNIT),
        }
    }

    /// Cuts the output limits of `requests` (one response's executions) to the response
    /// cap, and waits for their share of the budget.
    pub async fn reserve(&self, requests: &mut [ExecRequest]) -> Result<Reservation, ApiError> {
        let streams = 2 * requests.len().max(1) as u64;
        let per_stream = self.max_response_bytes / streams;
        let mut bytes = 0u64;
        for request in requests.iter_mut() {
            let limits = &mut request.limits;
            limits.output_bytes = limits.output_bytes.min(per_stream);
            bytes += 2 * (limits.output_bytes + OVERHEAD_BYTES);
        }
        // The bytes and their decoded copy; never more than the whole budget.
        let units = (2 * bytes).div_ceil(UNIT).min(self.total_units) as u32;
        self.units
            .clone()
            .acquire_many_owned(units)
            .await
            .map_err(|_| ApiError::unavailable("the server is shutting down"))
    }

    /// Waits for `bytes` of the budget (a request body, a file download): never more
    /// than the whole budget.
    pub async fn reserve_bytes(&self, bytes: u64) -> Result<Reservation, ApiError> {
        let units = bytes.div_ceil(UNIT).clamp(1, self.total_units) as u32;
        self.units
            .clone()
            .acquire_many_owned(units)
            .await
            .map_err(|_| ApiError::unavailable("the server is shutting down"))
    }

    /// Bytes of the budget reserved now.
    pub fn reserved_bytes(&self) -> u64 {
        (self.total_units - self.units.available_permits() as u64) * UNIT
    }

    /// Bytes of the budget not reserved now.
    pub fn available_bytes(&self) -> u64 {
        self.units.available_permits() as u64 * UNIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use forkvm_protocol::exec::ExecLimits;

    fn request(output_bytes: u64) -> ExecRequest {
        let mut request = ExecRequest::python("");
        request.limits = ExecLimits {
            output_bytes,
            ..ExecLimits::default()
        };
        request
    }

    #[tokio::test]
    async fn a_batch_shares_the_response_cap_and_reserves_from_the_budget() {
        let budget = ResultBudget::new(64 << 20, 8 << 20);
        let mut batch: Vec<_> = (0..8).map(|_| request(64 << 20)).collect();
        let held = budget.reserve(&mut batch).await.unwrap();
        // 8 MiB over 16 streams.
        assert!(batch.iter().all(|r| r.limits.output_bytes == 512 << 10));
        let reserved = (64 << 20) - budget.available_bytes();
        assert!(
            (2 * (8 << 20)..2 * (9 << 20)).contains(&reserved),
            "{reserved}"
        );
        drop(held);
        assert_eq!(budget.available_bytes(), 64 << 20);
        // A small request keeps its own limit.
        let mut one = [request(1 << 20)];
        let _held = budget.reserve(&mut one).await.unwrap();
        assert_eq!(one[0].limits.output_bytes, 1 << 20);
    }

    #[tokio::test]
    async fn a_spent_budget_makes_requests_wait_not_fail() {
        let budget = Arc::new(ResultBudget::new(8 << 20, 8 << 20));
        let held = budget.reserve(&mut [request(4 << 20)]).await.unwrap();
        let waiting = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.reserve(&mut [request(1 << 20)]).await.is_ok() })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        drop(held);
        assert!(waiting.await.unwrap());
    }
}

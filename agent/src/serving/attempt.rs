//! The attempt policy, pure: after a leg failed, is the request tried again on other engines,
//! moved to another engine, or ended with an error?
//!
//! The promise to clients: a request is retried only before its first token (nothing was
//! sent, so another engine starts it afresh); after it, it is moved only where the deployment's
//! driver replays exactly (the other engine recomputes the prompt and the tokens so far, and
//! sampling depends only on the seed and the output index), so the client's stream continues
//! as if nothing happened. Anything else ends the request with one error.

use pd_openai::ApiError;

use crate::wire::legs::Failure;

/// Why one attempt on one pair ended without the request's end.
pub(super) struct AttemptFail {
    pub(super) failure: Failure,
    pub(super) message: String,
    /// The engine that failed.
    pub(super) engine: String,
}

pub(super) enum Ended {
    Disconnected,
    Error(ApiError),
}

/// What to do after an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Before the first token: try other engines.
    Retry,
    /// After the first token: another engine replays the request and continues it.
    Move,
    /// End the request with this failure's error.
    Fail,
}

impl Next {
    /// The `pdagent_recoveries_total` label of a retry or a move.
    pub fn label(self) -> &'static str {
        match self {
            Next::Retry => "retry",
            Next::Move => "migration",
            Next::Fail => "fail",
        }
    }
}

/// A request's budget of retries and moves (`serving.retries`, `serving.migrations`) and what
/// it used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempts {
    pub retries_max: u32,
    pub migrations_max: u32,
    pub retries: u32,
    pub migrations: u32,
}

impl Attempts {
    pub fn new(retries_max: u32, migrations_max: u32) -> Self {
        Attempts {
            retries_max,
            migrations_max,
            retries: 0,
            migrations: 0,
        }
    }

    /// Decides after `failure`: `started` when the client already has tokens, `replay_exact`
    /// when the deployment's driver replays a request exactly. A retry or move is counted.
    pub fn after(&mut self, failure: Failure, started: bool, replay_exact: bool) -> Next {
        if !failure.retryable() {
            return Next::Fail;
        }
        if started {
            if replay_exact && self.migrations < self.migrations_max {
                self.migrations += 1;
                return Next::Move;
            }
        } else if self.retries < self.retries_max {
            self.retries += 1;
            return Next::Retry;
        }
        Next::Fail
    }
}

/// Whether a failure keeps its engine out of this agent's routing for a while (an engine that
/// died, a host that cannot be reached). Other failures only exclude the engine from the
/// request's own retries.
pub fn opens_circuit(failure: Failure) -> bool {
    matches!(failure, Failure::EngineLost | Failure::Unreachable)
}

/// Whether, when a retry finds no engine left but those the request already failed on, the
/// failed ones may be tried once more: only after a KV transfer failure (a link that was cut
/// for a moment; the pair may be the only one there is). The retry budget still bounds it.
pub fn retry_excluded_when_alone(failure: Failure) -> bool {
    failure == Failure::KvTransfer
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a KV transfer failure gives its pair a second chance when it is the only one.
    #[test]
    fn only_kv_transfer_failures_retry_the_same_pair() {
        for failure in ALL {
            assert_eq!(
                retry_excluded_when_alone(failure),
                failure == Failure::KvTransfer,
                "{failure:?}"
            );
        }
    }

    const ALL: [Failure; 8] = [
        Failure::NoEngine,
        Failure::Busy,
        Failure::BadRequest,
        Failure::PromptTooLong,
        Failure::EngineLost,
        Failure::KvTransfer,
        Failure::Internal,
        Failure::Unreachable,
    ];

    /// failure × started × replay-exact: retry only before the first token, move only after it
    /// and only where replay is exact, never on a failure another engine would repeat.
    #[test]
    fn retry_before_the_first_token_move_only_where_replay_is_exact() {
        for failure in ALL {
            for started in [false, true] {
                for exact in [false, true] {
                    let mut a = Attempts::new(2, 2);
                    let want = match (failure.retryable(), started, exact) {
                        (false, _, _) => Next::Fail,
                        (true, false, _) => Next::Retry,
                        (true, true, true) => Next::Move,
                        (true, true, false) => Next::Fail,
                    };
                    assert_eq!(
                        a.after(failure, started, exact),
                        want,
                        "{failure:?} started={started} exact={exact}"
                    );
                }
            }
        }
        // The failures another engine may not repeat.
        let retryable: Vec<Failure> = ALL.into_iter().filter(|f| f.retryable()).collect();
        assert_eq!(
            retryable,
            vec![
                Failure::NoEngine,
                Failure::Busy,
                Failure::EngineLost,
                Failure::KvTransfer,
                Failure::Unreachable
            ]
        );
    }

    /// Each budget is spent on its own: retries do not use up moves, and the request fails
    /// once the budget of its phase is spent.
    #[test]
    fn budgets_are_counted_apart_and_run_out() {
        let mut a = Attempts::new(2, 1);
        assert_eq!(a.after(Failure::Busy, false, true), Next::Retry);
        assert_eq!(a.after(Failure::EngineLost, false, true), Next::Retry);
        assert_eq!(a.after(Failure::Busy, false, true), Next::Fail);
        assert_eq!(a.after(Failure::EngineLost, true, true), Next::Move);
        assert_eq!(a.after(Failure::EngineLost, true, true), Next::Fail);
        assert_eq!((a.retries, a.migrations), (2, 1));
        // No budget at all: the first failure is final.
        let mut none = Attempts::new(0, 0);
        assert_eq!(none.after(Failure::Unreachable, false, true), Next::Fail);
        assert_eq!(none.after(Failure::Unreachable, true, true), Next::Fail);
    }

    /// Only an engine that died or a host that cannot be reached is kept out of routing.
    #[test]
    fn circuits_open_for_lost_engines_and_unreachable_hosts() {
        let open: Vec<Failure> = ALL.into_iter().filter(|f| opens_circuit(*f)).collect();
        assert_eq!(open, vec![Failure::EngineLost, Failure::Unreachable]);
    }
}

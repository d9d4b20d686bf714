//! The readiness check behind `/readyz`: one check of the backend at a time, its answer shared
//! by every probe waiting for it and remembered for a second, so concurrent probes (or a probe
//! flood from inside the cluster) cost one API list and, at most every 30 s, one set of
//! permission reviews — not one per probe. The reason a check failed goes to the log; callers
//! of the admin port are not authenticated and get a terse answer.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::cluster::Cluster;
use crate::readcache::SingleFlight;

/// How long one check's answer stands for the probes that follow.
const REMEMBERED: Duration = Duration::from_secs(1);
/// How long a check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// Why the backend is not ready, as the admin port says it (the details are in the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotReady {
    /// The backend answered with an error (unreachable, CRD missing, permission missing).
    Backend,
    /// The backend did not answer within [`CHECK_TIMEOUT`].
    Timeout,
}

impl NotReady {
    pub fn body(self) -> &'static str {
        match self {
            NotReady::Backend => "not ready: backend unavailable\n",
            NotReady::Timeout => "not ready: backend did not answer in time\n",
        }
    }
}

type Answer = Result<(), NotReady>;

#[derive(Default)]
pub struct Readiness {
    checking: SingleFlight<(), Answer>,
    last: Mutex<Option<(Instant, Answer)>>,
}

impl Readiness {
    /// Whether `cluster` is ready to serve `namespace` (one check at a time, shared).
    pub async fn check(&self, cluster: &dyn Cluster, namespace: &str) -> Answer {
        if let Some((at, answer)) = *self.last.lock().expect("readiness poisoned")
            && at.elapsed() < REMEMBERED
        {
            return answer;
        }
        let (answer, _) = self
            .checking
            .run(&(), || async {
                let answer = match tokio::time::timeout(CHECK_TIMEOUT, cluster.check_ready(namespace)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(reason)) => {
                        tracing::warn!(reason = %reason, "not ready");
                        Err(NotReady::Backend)
                    }
                    Err(_) => {
                        tracing::warn!(timeout = ?CHECK_TIMEOUT, "not ready: the backend did not answer the readiness check");
                        Err(NotReady::Timeout)
                    }
                };
                *self.last.lock().expect("readiness poisoned") = Some((Instant::now(), answer));
                answer
            })
            .await;
        answer
    }
}

//! The pull loop with several replicas on one database: one pulls at a time (the source
//! lease); when it stops, another takes over.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use source::pull::{PullHealth, run};
use source::{CheckReport, Round, Source, SourceResult, SourceUser};
use store::SystemClock;

/// A source that counts its pulls and reports nothing new.
#[derive(Debug, Default)]
struct Counting(AtomicU64);

#[async_trait]
impl Source for Counting {
    fn kind(&self) -> &'static str {
        "counting"
    }
    async fn pull(&self, _: Option<&str>) -> SourceResult<Round> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(Round {
            cursor: "c".into(),
            ..Round::default()
        })
    }
    async fn user(&self, _: &str) -> SourceResult<Option<SourceUser>> {
        Ok(None)
    }
    async fn check(&self) -> SourceResult<CheckReport> {
        Ok(CheckReport::default())
    }
}

#[tokio::test]
async fn one_replica_pulls_at_a_time_and_another_takes_over_when_it_stops() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/pull.db", dir.path().display());
    let store = store::open(&url, Arc::new(SystemClock)).await.unwrap();
    let (a, b) = (Arc::new(Counting::default()), Arc::new(Counting::default()));
    let every = Duration::from_millis(50);
    let (stop_a, rx_a) = tokio::sync::oneshot::channel::<()>();
    let (stop_b, rx_b) = tokio::sync::oneshot::channel::<()>();
    let replica = |src: Arc<Counting>, rx: tokio::sync::oneshot::Receiver<()>| {
        tokio::spawn(run(
            store.clone(),
            src,
            vec!["g".into()],
            every,
            Arc::new(SystemClock),
            PullHealth::default(),
            async move {
                let _ = rx.await;
            },
        ))
    };
    let ta = replica(a.clone(), rx_a);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let tb = replica(b.clone(), rx_b);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (na, nb) = (a.0.load(Ordering::SeqCst), b.0.load(Ordering::SeqCst));
    assert!(na >= 3, "the first replica pulls every interval: {na}");
    assert_eq!(
        nb, 0,
        "the second replica never pulls while the first holds the lease"
    );

    // The holder stops (and lets the lease go): the other pulls from then on.
    stop_a.send(()).unwrap();
    ta.await.unwrap();
    // What it pulled until it stopped (it may have pulled once more since `na` was read).
    let stopped_at = a.0.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let nb = b.0.load(Ordering::SeqCst);
    assert!(nb >= 2, "the standby took over: {nb}");
    assert_eq!(
        a.0.load(Ordering::SeqCst),
        stopped_at,
        "the stopped replica pulls no more"
    );
    stop_b.send(()).unwrap();
    tb.await.unwrap();
}

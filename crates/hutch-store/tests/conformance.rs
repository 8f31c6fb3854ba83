//! The conformance suite against both local backends.

mod common;

mod memory {
    hutch_store::conformance_tests!(super::common::Memory);
}

mod redb {
    hutch_store::conformance_tests!(super::common::Redb::new());
}

#[tokio::test(flavor = "current_thread")]
async fn whole_suite_on_a_current_thread_runtime() {
    hutch_store::conformance::run_all(&common::Memory).await;
}

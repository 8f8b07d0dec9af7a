//! `fleet-test-consumer`: fleet-consumer with the built-in handlers plus kinds that only tests
//! need. `abort` kills the whole process (a poison message: the delivery limit must stop it);
//! `panic` panics in the handler (the worker must survive it).

use fleet_consumer::registry::{HandlerError, TaskContext, Work};
use serde_json::Value;
use std::process::ExitCode;

async fn abort(_: Value, _: TaskContext) -> Result<Value, HandlerError> {
    std::process::abort()
}

async fn panic(payload: Value, _: TaskContext) -> Result<Value, HandlerError> {
    panic!("asked to panic with {payload}")
}

fn main() -> ExitCode {
    let settings = match fleet_shared::cli::load_settings(None) {
        Ok(settings) => settings,
        Err(code) => return code,
    };
    let mut registry =
        fleet_consumer::handlers::registry(&settings).expect("built-in kinds are distinct");
    registry
        .register("abort", Work::Compute, abort)
        .and_then(|r| r.register("panic", Work::Compute, panic))
        .expect("test kinds are distinct");
    fleet_shared::cli::run(settings, |settings, shutdown| {
        fleet_consumer::run(settings, registry, shutdown)
    })
}

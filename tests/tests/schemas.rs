//! The JSON Schemas shipped in `schemas/` describe what the envelope module writes, so other
//! services can validate against them.

use chrono::Utc;
use fleet_shared::envelope::{
    self, BatchManifest, ErrorInfo, ResultGroup, Status, Task, TaskResult,
};
use serde_json::{Value, json};

fn load(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../schemas")
        .join(name);
    let text = std::fs::read_to_string(&path).expect("schema file");
    serde_json::from_str(&text).expect("schema is JSON")
}

fn schema(name: &str) -> jsonschema::Validator {
    schema_with(name, &[])
}

/// The schema `name`, with the shipped schemas it refers to (`$ref` by file name; every `$id`
/// is `fleet/<file>`, resolved against jsonschema's default base).
fn schema_with(name: &str, refs: &[&str]) -> jsonschema::Validator {
    let mut options = jsonschema::options();
    for referred in refs {
        let resource = jsonschema::Resource::from_contents(load(referred)).expect("a schema");
        options = options.with_resource(format!("json-schema:///fleet/{referred}"), resource);
    }
    options.build(&load(name)).expect("schema compiles")
}

fn encoded<T: serde::Serialize>(message: &T) -> Value {
    serde_json::from_slice(&envelope::encode(message)).expect("envelope is JSON")
}

#[test]
fn encoded_messages_match_the_shipped_schemas() {
    let task = schema("task.v1.json");
    let mut t = Task::new(
        "id-1".into(),
        "square".into(),
        Some("b".into()),
        json!({ "n": 3 }),
    );
    assert!(task.is_valid(&encoded(&t)));
    t.deadline = Some(Utc::now());
    t.batch = None;
    assert!(task.is_valid(&encoded(&t)));
    assert!(!task.is_valid(&json!({ "v": 2, "id": "x", "kind": "k", "payload": {}, "created_at": "2026-01-01T00:00:00Z" })));
    assert!(!task.is_valid(
        &json!({ "v": 1, "kind": "k", "payload": {}, "created_at": "2026-01-01T00:00:00Z" })
    ));

    let result = schema("result.v1.json");
    let failed = TaskResult {
        v: 1,
        task_id: "id-1".into(),
        batch: None,
        kind: "square".into(),
        status: Status::Failed,
        output: None,
        error: Some(ErrorInfo {
            kind: "overflow".into(),
            message: "too big".into(),
        }),
        attempts: 1,
        worker: "host/1/0".into(),
        started_at: Utc::now(),
        finished_at: Utc::now(),
        published_by: None,
        traceparent: Some(fleet_shared::trace::TraceParent::root().to_string()),
    };
    assert!(result.is_valid(&encoded(&failed)));
    let mut bad_trace = encoded(&failed);
    bad_trace["traceparent"] = json!("not-a-traceparent");
    assert!(!result.is_valid(&bad_trace));
    assert!(!result.is_valid(&json!({ "v": 1, "task_id": "x", "status": "maybe" })));

    let group = schema_with("results.v1.json", &["result.v1.json"]);
    let mut ok = failed.clone();
    ok.status = Status::Ok;
    ok.output = Some(json!({ "n": 3, "square": 9 }));
    ok.error = None;
    assert!(group.is_valid(&encoded(&ResultGroup::new(vec![failed, ok]))));
    assert!(!group.is_valid(&json!({ "v": 1, "type": "results", "results": [] })));
    assert!(!group.is_valid(
        &json!({ "v": 1, "type": "results", "results": [{ "v": 1, "task_id": "x", "status": "maybe" }] })
    ));

    let manifest = schema("batch.v1.json");
    assert!(manifest.is_valid(&encoded(&BatchManifest::new(
        "b".into(),
        3,
        "square".into()
    ))));
}

#[test]
fn the_schemas_state_the_bounds_the_decoder_checks() {
    let task = schema("task.v1.json");
    let manifest = schema("batch.v1.json");
    let with = |id: &str, batch: &str| {
        encoded(&Task::new(
            id.into(),
            "square".into(),
            Some(batch.into()),
            json!({}),
        ))
    };
    let within = with(&"i".repeat(255), "b");
    assert!(task.is_valid(&within));
    assert!(envelope::decode_task(&envelope::encode(&within)).is_ok());
    for (id, batch) in [
        ("i".repeat(256), "b".to_owned()),
        (String::new(), "b".to_owned()),
        ("a\u{1b}[2J".to_owned(), "b".to_owned()),
        ("i".to_owned(), "b".repeat(256)),
        ("i".to_owned(), "b\u{85}".to_owned()),
    ] {
        let past = with(&id, &batch);
        assert!(!task.is_valid(&past), "the schema refuses {past}");
        assert!(
            envelope::decode_task(&envelope::encode(&past)).is_err(),
            "the decoder refuses {past}"
        );
    }
    let long = encoded(&BatchManifest::new("b".repeat(256), 1, "square".into()));
    assert!(!manifest.is_valid(&long));
}

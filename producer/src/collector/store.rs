//! The result store: SQLite, one transaction per group of results; the first result for a task
//! id wins, later ones are counted as duplicates of their batch.

use fleet_shared::envelope::{self, BatchManifest, ResultMessage, Status, TaskResult};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// A batch's progress, as `GET /v1/batches/{id}` returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchStatus {
    /// Batch id.
    pub batch: String,
    /// Tasks in the batch; `null` until its manifest has arrived.
    pub total: Option<u64>,
    /// Distinct tasks with a stored result.
    pub done: u64,
    /// Of those, ok.
    pub ok: u64,
    /// Of those, failed.
    pub failed: u64,
    /// Results that arrived again for a task already stored.
    pub duplicates: u64,
    /// The manifest is in and `done == total`.
    pub complete: bool,
}

/// What one [`Store::store`] call did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    /// New results stored.
    pub results: u64,
    /// Results for tasks already stored.
    pub duplicates: u64,
    /// Batch manifests recorded.
    pub manifests: u64,
    /// Batches this group completed: their last result or their manifest came in it.
    pub completed: Vec<String>,
}

/// A connection to the result database. Each batch's ok, failed and duplicate counts are kept
/// in `batches` beside its total, so a batch's progress is one row however large it is.
pub struct Store {
    conn: Connection,
}

/// New results of one batch in one group.
#[derive(Debug, Default)]
struct Added {
    ok: u64,
    failed: u64,
    /// Its manifest came in for the first time.
    manifest: bool,
}

/// `seq` is the rowid: SQLite gives each new row one past the largest, so results keep the order
/// they were stored in (rows are never deleted here). Without `AUTOINCREMENT`, which would also
/// rewrite `sqlite_sequence` in every commit: a page fewer written and synced per stored group.
/// Databases made with it keep it; both read the same.
const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = FULL;
CREATE TABLE IF NOT EXISTS results (
    seq          INTEGER PRIMARY KEY,
    task_id      TEXT NOT NULL UNIQUE,
    batch        TEXT,
    kind         TEXT NOT NULL,
    status       TEXT NOT NULL,
    body         TEXT NOT NULL,
    stored_at_us INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS results_by_batch ON results (batch, seq);
CREATE TABLE IF NOT EXISTS batches (
    batch      TEXT PRIMARY KEY,
    kind       TEXT,
    total      INTEGER,
    duplicates INTEGER NOT NULL DEFAULT 0
);
";

/// Databases made before a batch's counts were kept in `batches` get the columns, filled in
/// from the results once.
const COUNTS: &str = "
ALTER TABLE batches ADD COLUMN ok INTEGER NOT NULL DEFAULT 0;
ALTER TABLE batches ADD COLUMN failed INTEGER NOT NULL DEFAULT 0;
INSERT INTO batches (batch) SELECT DISTINCT batch FROM results WHERE batch IS NOT NULL
    ON CONFLICT (batch) DO NOTHING;
UPDATE batches SET
    ok = (SELECT COUNT(*) FROM results WHERE results.batch = batches.batch AND status = 'ok'),
    failed = (SELECT COUNT(*) FROM results WHERE results.batch = batches.batch AND status = 'failed');
";

impl Store {
    /// Opens (creating if needed) the database at `path`.
    ///
    /// Fails when the file cannot be opened or created, or the schema cannot be applied.
    pub fn open(path: &Path) -> rusqlite::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt as _;
        // Results are nobody else's: a new store is made 0600 (SQLite gives its -wal and -shm
        // files the database's mode).
        if let Err(e) = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            && e.kind() != std::io::ErrorKind::AlreadyExists
        {
            return Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                Some(format!("creating {}: {e}", path.display())),
            ));
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        let counted: bool = conn.query_row(
            "SELECT COUNT(*) > 0 FROM pragma_table_info('batches') WHERE name = 'ok'",
            [],
            |row| row.get(0),
        )?;
        if !counted {
            conn.execute_batch(&format!("BEGIN IMMEDIATE; {COUNTS} COMMIT;"))?;
        }
        Ok(Self { conn })
    }

    /// Stores results (alone or in groups) and manifests in one transaction, with each batch's
    /// counts.
    ///
    /// Fails (and stores nothing) when the database cannot be written.
    pub fn store(&mut self, messages: &[ResultMessage]) -> rusqlite::Result<Stored> {
        let now_us = chrono::Utc::now().timestamp_micros();
        let tx = self.conn.transaction()?;
        let mut stored = Stored::default();
        // Batches this group moved forward: new results, or their manifest for the first time.
        let mut touched: BTreeMap<&str, Added> = BTreeMap::new();
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO results (task_id, batch, kind, status, body, stored_at_us)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (task_id) DO NOTHING",
            )?;
            let mut duplicate = tx.prepare_cached(
                "INSERT INTO batches (batch, duplicates) VALUES (?1, 1)
                 ON CONFLICT (batch) DO UPDATE SET duplicates = duplicates + 1",
            )?;
            let mut known_total =
                tx.prepare_cached("SELECT total FROM batches WHERE batch = ?1")?;
            let mut manifest = tx.prepare_cached(
                "INSERT INTO batches (batch, kind, total) VALUES (?1, ?2, ?3)
                 ON CONFLICT (batch) DO UPDATE SET kind = excluded.kind, total = excluded.total
                 WHERE batches.total IS NULL",
            )?;
            for message in messages {
                let (results, manifest_of) = match message {
                    ResultMessage::Result(result) => (std::slice::from_ref(result), None),
                    ResultMessage::Results(results) => (results.as_slice(), None),
                    ResultMessage::Manifest(m) => (&[][..], Some(m)),
                };
                for result in results {
                    let status = match result.status {
                        Status::Ok => "ok",
                        Status::Failed => "failed",
                    };
                    let body =
                        String::from_utf8(envelope::encode(result)).expect("JSON is always UTF-8");
                    let inserted = insert.execute(params![
                        result.task_id,
                        result.batch,
                        result.kind,
                        status,
                        body,
                        now_us
                    ])?;
                    if inserted == 1 {
                        stored.results += 1;
                        if let Some(batch) = &result.batch {
                            let added = touched.entry(batch).or_default();
                            match result.status {
                                Status::Ok => added.ok += 1,
                                Status::Failed => added.failed += 1,
                            }
                        }
                    } else {
                        stored.duplicates += 1;
                        if let Some(batch) = &result.batch {
                            duplicate.execute(params![batch])?;
                        }
                    }
                }
                if let Some(BatchManifest {
                    batch, total, kind, ..
                }) = manifest_of
                {
                    let known: Option<Option<u64>> = known_total
                        .query_row([batch], |row| row.get(0))
                        .optional()?;
                    // The first manifest of a batch wins, as the first result of a task does: a
                    // later one (a producer's, about a batch it did not make) cannot change its
                    // total nor reopen a complete batch.
                    match known.flatten() {
                        None => touched.entry(batch).or_default().manifest = true,
                        Some(first) if first != *total => tracing::warn!(
                            batch = %batch, first, later = total,
                            "a second manifest with another total; the first stands"
                        ),
                        Some(_) => {}
                    }
                    manifest.execute(params![
                        batch,
                        kind,
                        i64::try_from(*total).unwrap_or(i64::MAX)
                    ])?;
                    stored.manifests += 1;
                }
            }
            // One count update and one read per batch the group moved: a batch completes in
            // the group that brings its last result or its manifest.
            let mut count = tx.prepare_cached(
                "INSERT INTO batches (batch, ok, failed) VALUES (?1, ?2, ?3)
                 ON CONFLICT (batch) DO UPDATE SET ok = ok + excluded.ok, failed = failed + excluded.failed
                 RETURNING total, ok + failed",
            )?;
            for (batch, added) in touched {
                let (total, done): (Option<u64>, u64) = count
                    .query_row(params![batch, added.ok, added.failed], |row| {
                        Ok((row.get(0)?, row.get(1)?))
                    })?;
                if total == Some(done) {
                    stored.completed.push(batch.to_owned());
                }
            }
        }
        tx.commit()?;
        Ok(stored)
    }

    /// The stored result of task `id`, as its JSON text.
    ///
    /// Fails when the database cannot be read.
    pub fn task(&self, id: &str) -> rusqlite::Result<Option<String>> {
        self.conn
            .query_row("SELECT body FROM results WHERE task_id = ?1", [id], |row| {
                row.get(0)
            })
            .optional()
    }

    /// The batch's progress; `None` when neither its manifest nor any result has been stored.
    ///
    /// Fails when the database cannot be read.
    pub fn batch(&self, id: &str) -> rusqlite::Result<Option<BatchStatus>> {
        let row: Option<(Option<u64>, u64, u64, u64)> = self
            .conn
            .prepare_cached("SELECT total, ok, failed, duplicates FROM batches WHERE batch = ?1")?
            .query_row([id], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
            })
            .optional()?;
        Ok(row.map(|(total, ok, failed, duplicates)| {
            let done = ok + failed;
            BatchStatus {
                batch: id.to_owned(),
                total,
                done,
                ok,
                failed,
                duplicates,
                complete: total.is_some_and(|t| done >= t),
            }
        }))
    }

    /// Up to `limit` results of the batch in storage order, skipping `offset`, as JSON texts.
    ///
    /// Fails when the database cannot be read.
    pub fn results(&self, batch: &str, offset: u64, limit: u64) -> rusqlite::Result<Vec<String>> {
        Ok(self.results_within(batch, offset, limit, usize::MAX)?.0)
    }

    /// As [`Store::results`], and no more than `max_bytes` of them (always at least one): rows
    /// are read one at a time, so a page never holds more than that in memory. True with the
    /// rows when the byte bound, not `limit` or the end, cut the page.
    ///
    /// Fails when the database cannot be read.
    pub fn results_within(
        &self,
        batch: &str,
        offset: u64,
        limit: u64,
        max_bytes: usize,
    ) -> rusqlite::Result<(Vec<String>, bool)> {
        let mut query = self.conn.prepare_cached(
            "SELECT body FROM results WHERE batch = ?1 ORDER BY seq LIMIT ?2 OFFSET ?3",
        )?;
        let mut rows = query.query(params![batch, limit, offset])?;
        let (mut page, mut bytes) = (Vec::new(), 0usize);
        while let Some(row) = rows.next()? {
            let size = row.get_ref(0)?.as_bytes().map_or(0, <[u8]>::len);
            if !page.is_empty() && bytes.saturating_add(size) > max_bytes {
                return Ok((page, true));
            }
            bytes = bytes.saturating_add(size);
            page.push(row.get(0)?);
        }
        Ok((page, false))
    }

    /// Submit-to-stored facts for benchmarks: (task id, stored_at in µs since the epoch).
    ///
    /// Fails when the database cannot be read.
    pub fn stored_times(&self, batch: &str) -> rusqlite::Result<Vec<(String, i64)>> {
        let mut query = self
            .conn
            .prepare("SELECT task_id, stored_at_us FROM results WHERE batch = ?1")?;
        let rows = query.query_map([batch], |row| Ok((row.get(0)?, row.get(1)?)))?;
        rows.collect()
    }
}

/// Decodes a stored result's JSON text.
pub fn parse(body: &str) -> Option<TaskResult> {
    match envelope::decode_result(body.as_bytes()) {
        Ok(ResultMessage::Result(result)) => Some(result),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn result(id: &str, batch: &str, status: Status) -> ResultMessage {
        ResultMessage::Result(TaskResult {
            v: 1,
            task_id: id.into(),
            batch: Some(batch.into()),
            kind: "square".into(),
            status,
            output: None,
            error: None,
            attempts: 1,
            worker: "h/1/0".into(),
            started_at: Utc::now(),
            finished_at: Utc::now(),
            published_by: None,
            traceparent: None,
        })
    }

    #[test]
    fn first_result_wins_and_duplicates_are_counted() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut store = Store::open(&dir.path().join("r.db")).expect("open");
        let stored = store
            .store(&[
                result("a", "b1", Status::Ok),
                result("a", "b1", Status::Failed),
                result("b", "b1", Status::Failed),
            ])
            .expect("store");
        assert_eq!(
            stored,
            Stored {
                results: 2,
                duplicates: 1,
                manifests: 0,
                completed: vec![],
            }
        );
        let status = store.batch("b1").expect("read").expect("known");
        assert_eq!(
            (
                status.total,
                status.done,
                status.ok,
                status.failed,
                status.duplicates
            ),
            (None, 2, 1, 1, 1)
        );
        assert!(!status.complete);
        let manifest =
            || ResultMessage::Manifest(BatchManifest::new("b1".into(), 2, "square".into()));
        let stored = store.store(&[manifest()]).expect("store manifest");
        assert_eq!(stored.completed, ["b1"], "the manifest completes the batch");
        let status = store.batch("b1").expect("read").expect("known");
        assert!(status.complete);
        assert_eq!(status.duplicates, 1);
        // A redelivered manifest or result does not complete it a second time.
        let stored = store
            .store(&[manifest(), result("b", "b1", Status::Ok)])
            .expect("store again");
        assert!(stored.completed.is_empty());
        assert!(
            parse(&store.task("a").expect("read").expect("stored"))
                .is_some_and(|r| r.status == Status::Ok)
        );
        assert_eq!(store.results("b1", 1, 10).expect("read").len(), 1);
        assert!(store.batch("nope").expect("read").is_none());
        // A second manifest with another total changes nothing: the first stands.
        let other = ResultMessage::Manifest(BatchManifest::new("b1".into(), 5, "other".into()));
        let stored = store.store(&[other]).expect("store a second manifest");
        assert!(stored.completed.is_empty());
        let status = store.batch("b1").expect("read").expect("known");
        assert_eq!((status.total, status.complete), (Some(2), true));
    }

    #[test]
    fn a_result_group_is_stored_like_its_results_one_by_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut store = Store::open(&dir.path().join("r.db")).expect("open");
        let alone = |message: ResultMessage| match message {
            ResultMessage::Result(result) => result,
            other => panic!("not a result: {other:?}"),
        };
        let group = ResultMessage::Results(vec![
            alone(result("a", "b3", Status::Ok)),
            alone(result("b", "b3", Status::Failed)),
            alone(result("a", "b3", Status::Failed)),
        ]);
        let manifest = ResultMessage::Manifest(BatchManifest::new("b3".into(), 3, "square".into()));
        let stored = store
            .store(&[manifest, group, result("c", "b3", Status::Ok)])
            .expect("store");
        assert_eq!(
            stored,
            Stored {
                results: 3,
                duplicates: 1,
                manifests: 1,
                completed: vec!["b3".to_owned()],
            }
        );
        let status = store.batch("b3").expect("read").expect("known");
        assert_eq!(
            (status.done, status.ok, status.failed, status.duplicates),
            (3, 2, 1, 1)
        );
        assert!(
            parse(&store.task("a").expect("read").expect("stored"))
                .is_some_and(|r| r.status == Status::Ok),
            "the first result of a task in a group wins"
        );
    }

    #[test]
    fn results_come_back_in_the_order_they_were_stored_page_by_page() {
        // A new database, and one made with `AUTOINCREMENT` as earlier versions did.
        for autoincrement in [false, true] {
            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().join("r.db");
            if autoincrement {
                let old =
                    SCHEMA.replace("INTEGER PRIMARY KEY,", "INTEGER PRIMARY KEY AUTOINCREMENT,");
                assert_ne!(old, SCHEMA);
                Connection::open(&path)
                    .expect("create")
                    .execute_batch(&old)
                    .expect("old schema");
            }
            let mut store = Store::open(&path).expect("open");
            // Two batches interleaved over several commits, and a reopen in between.
            let ids: Vec<String> = (0..12).map(|i| format!("t{i:02}")).collect();
            for (i, pair) in ids.chunks(2).enumerate() {
                if i == 3 {
                    store = Store::open(&path).expect("reopen");
                }
                let messages: Vec<_> = pair
                    .iter()
                    .map(|id| result(id, "b4", Status::Ok))
                    .chain([result(&format!("other{i}"), "b5", Status::Ok)])
                    .collect();
                store.store(&messages).expect("store");
            }
            let mut read = Vec::new();
            for offset in (0..12).step_by(5) {
                for body in store.results("b4", offset, 5).expect("read") {
                    read.push(parse(&body).expect("a result").task_id);
                }
            }
            assert_eq!(read, ids, "autoincrement: {autoincrement}");
            // A byte bound cuts a page after the row that reaches it, and says so.
            let one = store.results("b4", 0, 1).expect("read")[0].len();
            let (page, cut) = store.results_within("b4", 0, 5, one * 2).expect("read");
            assert_eq!((page.len(), cut), (2, true));
            let (page, cut) = store.results_within("b4", 10, 5, 1).expect("read");
            assert_eq!(
                (page.len(), cut),
                (1, true),
                "at least one row, whatever its size"
            );
            let (page, cut) = store.results_within("b4", 11, 5, 1).expect("read");
            assert_eq!((page.len(), cut), (1, false), "the end is no cut");
            let counted: Option<i64> = store
                .conn
                .query_row(
                    "SELECT seq FROM sqlite_sequence WHERE name = 'results'",
                    [],
                    |row| row.get(0),
                )
                .ok();
            assert_eq!(counted, autoincrement.then_some(18));
        }
    }

    #[test]
    fn the_group_with_the_last_result_completes_the_batch_once_across_reopens() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("r.db");
        let mut store = Store::open(&path).expect("open");
        let manifest = ResultMessage::Manifest(BatchManifest::new("b2".into(), 3, "square".into()));
        let stored = store
            .store(&[manifest, result("x", "b2", Status::Ok)])
            .expect("store");
        assert!(stored.completed.is_empty());
        // A new store (a restarted collector) learns the batch's progress from the database.
        let mut store = Store::open(&path).expect("reopen");
        let stored = store
            .store(&[result("y", "b2", Status::Ok)])
            .expect("store");
        assert!(stored.completed.is_empty());
        let stored = store
            .store(&[
                result("y", "b2", Status::Ok),
                result("z", "b2", Status::Failed),
            ])
            .expect("store");
        assert_eq!(stored.completed, ["b2"], "the third result completes it");
        let stored = store
            .store(&[result("z", "b2", Status::Ok)])
            .expect("store");
        assert!(
            stored.completed.is_empty(),
            "a duplicate does not complete it again"
        );
    }

    #[test]
    fn a_database_from_before_the_counts_gets_them_from_its_results() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("r.db");
        {
            let old = Connection::open(&path).expect("create");
            old.execute_batch(SCHEMA).expect("old schema");
            old.execute_batch(
                "INSERT INTO batches (batch, kind, total) VALUES ('b', 'square', 4);
                 INSERT INTO results (task_id, batch, kind, status, body, stored_at_us) VALUES
                   ('1', 'b', 'square', 'ok', '{}', 0), ('2', 'b', 'square', 'failed', '{}', 0),
                   ('3', 'b', 'square', 'ok', '{}', 0), ('4', 'c', 'square', 'ok', '{}', 0);",
            )
            .expect("old rows");
        }
        let mut store = Store::open(&path).expect("open and upgrade");
        let b = store.batch("b").expect("read").expect("batch b");
        assert_eq!((b.total, b.ok, b.failed, b.done), (Some(4), 2, 1, 3));
        let c = store
            .batch("c")
            .expect("read")
            .expect("batch c, results only");
        assert_eq!((c.total, c.ok, c.failed, c.complete), (None, 1, 0, false));
        let stored = store.store(&[result("5", "b", Status::Ok)]).expect("store");
        assert_eq!(
            stored.completed,
            ["b"],
            "the counts carry on from the old rows"
        );
        drop(store);
        Store::open(&path).expect("a second open does not upgrade again");
    }
}

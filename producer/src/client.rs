//! A client of the collector's read API.

use crate::collector::store::BatchStatus;
use anyhow::Context as _;
use fleet_shared::envelope::{self, ResultMessage, TaskResult};

/// Talks to one collector.
#[derive(Debug, Clone)]
pub struct CollectorClient {
    base: String,
    http: reqwest::Client,
}

/// Results per page when reading a batch's results.
pub const PAGE: usize = 1000;

impl CollectorClient {
    /// A client for the collector at `base` (e.g. `http://127.0.0.1:8081`).
    pub fn new(base: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            http: reqwest::Client::new(),
        }
    }

    /// The batch's progress; `None` while the collector has seen nothing of it.
    ///
    /// Fails when the collector cannot be reached or answers with an error.
    pub async fn batch(&self, batch: &str) -> anyhow::Result<Option<BatchStatus>> {
        self.optional(&format!("{}/v1/batches/{batch}", self.base))
            .await
    }

    /// The stored result of one task; `None` while there is none.
    ///
    /// Fails when the collector cannot be reached or answers with an error.
    pub async fn task(&self, id: &str) -> anyhow::Result<Option<TaskResult>> {
        self.optional(&format!("{}/v1/tasks/{id}", self.base)).await
    }

    /// GET `url` as JSON; a 404 is `None`.
    async fn optional<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
    ) -> anyhow::Result<Option<T>> {
        let response = self
            .http
            .get(url)
            .send()
            .await
            .with_context(|| format!("asking the collector at {url}"))?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let response = response
            .error_for_status()
            .with_context(|| format!("collector at {url}"))?;
        Ok(Some(
            response
                .json()
                .await
                .context("reading the collector's answer")?,
        ))
    }

    /// One page of the batch's results in storage order, starting at `offset`, and whether the
    /// collector's byte bound cut it short (more may follow even though it holds fewer than a
    /// page's count).
    ///
    /// Fails when the collector cannot be reached, answers with an error, or sends a bad line.
    pub async fn results_page(
        &self,
        batch: &str,
        offset: usize,
    ) -> anyhow::Result<(Vec<TaskResult>, bool)> {
        let url = format!(
            "{}/v1/batches/{batch}/results?offset={offset}&limit={PAGE}",
            self.base
        );
        let response = self
            .http
            .get(&url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .with_context(|| format!("asking the collector at {url}"))?;
        let truncated = response
            .headers()
            .contains_key(crate::collector::http::TRUNCATED);
        let body = response.bytes().await.context("reading results")?;
        let results = body
            .split(|b| *b == b'\n')
            .filter(|line| !line.is_empty())
            .map(|line| match envelope::decode_result(line) {
                Ok(ResultMessage::Result(result)) => Ok(result),
                Ok(ResultMessage::Manifest(_) | ResultMessage::Results(_)) => {
                    anyhow::bail!("the collector sent a manifest or a group as a result")
                }
                Err(e) => Err(anyhow::Error::new(e).context("a result line from the collector")),
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok((results, truncated))
    }

    /// All of the batch's results.
    ///
    /// Fails as [`CollectorClient::results_page`].
    pub async fn results(&self, batch: &str) -> anyhow::Result<Vec<TaskResult>> {
        let mut all = Vec::new();
        loop {
            let (page, truncated) = self.results_page(batch, all.len()).await?;
            let done = page.len() < PAGE && !truncated;
            all.extend(page);
            if done {
                return Ok(all);
            }
        }
    }
}

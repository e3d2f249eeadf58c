//! The Lambda side of the reader's contract: an event source mapping does
//! the leasing and checkpointing, the handler is the same. A Kinesis event
//! becomes [`Record`]s, and the handler's answer becomes a partial batch
//! response naming the first record not done, so Lambda retries from there
//! and nothing before it is handled twice. (The mapping needs
//! `ReportBatchItemFailures`; see `cloudformation/`.)

use aws_lambda_events::event::kinesis::KinesisEvent;
use aws_lambda_events::event::streams::{KinesisBatchItemFailure, KinesisEventResponse};
use bytes::Bytes;
use serde::{Deserialize, Deserializer};

use crate::Record;

/// A Kinesis event as Lambda delivers it, with each record's arrival time
/// read from the JSON number itself. `aws_lambda_events` (1.2) reads the
/// digits after the point as milliseconds whatever their count, so
/// `1796172423.5` arrives as 5 ms past the second, and every arrival whose
/// millisecond ends in a zero (printed `.99` for 990 ms) lands up to
/// 0.9 s early: core-data records that take their version from the arrival
/// would be ordered wrongly.
#[derive(Debug, Clone)]
pub struct KinesisBatch {
    pub event: KinesisEvent,
    /// Each record's `approximateArrivalTimestamp`, in milliseconds.
    pub arrivals_ms: Vec<Option<i64>>,
}

impl<'de> Deserialize<'de> for KinesisBatch {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        let arrivals_ms = value["Records"]
            .as_array()
            .map(|records| {
                records
                    .iter()
                    .map(|r| {
                        r["kinesis"]["approximateArrivalTimestamp"]
                            .as_f64()
                            .map(|seconds| (seconds * 1000.0).round() as i64)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let event = serde_json::from_value(value).map_err(serde::de::Error::custom)?;
        Ok(Self { event, arrivals_ms })
    }
}

/// CloudWatch namespace of the Lambdas' metrics.
pub const METRICS_NAMESPACE: &str = "adtrack";

/// Installs the metrics backend of a Lambda function: the `metrics` crate's
/// counters, gauges and histograms as CloudWatch embedded metric format
/// documents, one per invocation, written to the function's log (which
/// CloudWatch turns into metrics in [`METRICS_NAMESPACE`], dimension
/// `Function`), since a Lambda has no port to scrape.
pub fn install_metrics(
    function: &'static str,
) -> Result<&'static metrics_cloudwatch_embedded::Collector, metrics_cloudwatch_embedded::Error> {
    metrics_cloudwatch_embedded::Builder::new()
        .cloudwatch_namespace(METRICS_NAMESPACE)
        .with_dimension("Function", function)
        .init()
}

/// Runs a Lambda function behind a Kinesis event source mapping: each
/// invocation's event goes to `handle`, its partial batch response back to
/// Lambda, and the metrics it recorded to the log as one embedded metric
/// format document ([`install_metrics`], under `function`). Returns (with
/// the exit code the process should end with) only when the runtime fails.
pub async fn serve<F, Fut>(function: &'static str, handle: F) -> std::process::ExitCode
where
    F: Fn(KinesisBatch) -> Fut,
    Fut: std::future::Future<Output = KinesisEventResponse>,
{
    let metrics = match install_metrics(function) {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::error!(error = %e, "cannot install the metrics backend; running without metrics");
            None
        }
    };
    let handle = &handle;
    let result = lambda_runtime::run(lambda_runtime::service_fn(
        |event: lambda_runtime::LambdaEvent<KinesisBatch>| async move {
            let response = handle(event.payload).await;
            if let Some(m) = metrics {
                m.set_property("RequestId", event.context.request_id.clone());
                if let Err(e) = m.flush(std::io::stdout().lock()) {
                    tracing::warn!(error = %e, "cannot write this invocation's metrics");
                }
            }
            Ok::<_, lambda_runtime::Error>(response)
        },
    ))
    .await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("lambda runtime failed: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

/// The records of one invocation, in order.
pub fn records(batch: KinesisBatch) -> Vec<Record> {
    let arrivals = batch.arrivals_ms;
    batch
        .event
        .records
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            // eventID is "shardId-000000000000:sequenceNumber".
            let shard_id = r
                .event_id
                .as_deref()
                .and_then(|id| id.split(':').next())
                .unwrap_or("")
                .to_owned();
            Record {
                shard_id,
                arrival_ms: arrivals.get(i).copied().flatten(),
                sequence_number: r.kinesis.sequence_number,
                data: Bytes::from(r.kinesis.data.0),
            }
        })
        .collect()
}

/// The answer when the first `done` of `records` are done.
pub fn response(records: &[Record], done: usize) -> KinesisEventResponse {
    let mut response = KinesisEventResponse::default();
    if let Some(first) = records.get(done) {
        let mut failure = KinesisBatchItemFailure::default();
        failure.item_identifier = Some(first.sequence_number.clone());
        response.batch_item_failures.push(failure);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_written_as_embedded_metric_format() {
        let collector =
            install_metrics("test-function").expect("the only recorder of this test binary");
        metrics::counter!("adtrack_test_records", "outcome" => "applied").increment(3);
        let mut out = Vec::new();
        collector.flush(&mut out).expect("flush");
        let text = String::from_utf8(out).expect("utf-8");
        let doc: serde_json::Value = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).expect("one JSON document per line")
            })
            .find(|d| d.get("adtrack_test_records").is_some())
            .unwrap_or_else(|| panic!("no document with the counter: {text}"));
        assert_eq!(doc["adtrack_test_records"], 3);
        assert_eq!(doc["Function"], "test-function");
        assert_eq!(doc["outcome"], "applied");
        let cw = &doc["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(cw["Namespace"], METRICS_NAMESPACE);
        assert_eq!(cw["Metrics"][0]["Name"], "adtrack_test_records");
        assert_eq!(
            cw["Dimensions"],
            serde_json::json!([["Function", "outcome"]])
        );
    }

    fn record(seq: &str) -> Record {
        Record {
            shard_id: "shardId-000000000000".into(),
            sequence_number: seq.into(),
            data: Bytes::new(),
            arrival_ms: None,
        }
    }

    #[test]
    fn arrivals_are_read_to_the_millisecond() {
        let event = |arrival: &str| {
            let json = format!(
                r#"{{"Records":[{{"kinesis":{{"kinesisSchemaVersion":"1.0","partitionKey":"pk","sequenceNumber":"1","data":"eA==","approximateArrivalTimestamp":{arrival}}},"eventSource":"aws:kinesis","eventVersion":"1.0","eventID":"shardId-000000000000:1","eventName":"aws:kinesis:record","invokeIdentityArn":"arn:aws:iam::123456789012:role/r","awsRegion":"us-east-1","eventSourceARN":"arn:aws:kinesis:us-east-1:123456789012:stream/s"}}]}}"#
            );
            let batch: KinesisBatch = serde_json::from_str(&json).expect("a Kinesis event");
            records(batch)[0].arrival_ms
        };
        assert_eq!(event("1796172423.5"), Some(1_796_172_423_500));
        assert_eq!(event("1796172423.99"), Some(1_796_172_423_990));
        assert_eq!(event("1796172423.001"), Some(1_796_172_423_001));
        assert_eq!(event("1.796172423977E9"), Some(1_796_172_423_977));
        assert_eq!(event("1796172423"), Some(1_796_172_423_000));
    }

    #[test]
    fn names_the_first_record_not_done() {
        let rs = [record("1"), record("2"), record("3")];
        assert!(response(&rs, 3).batch_item_failures.is_empty());
        let r = response(&rs, 1);
        assert_eq!(r.batch_item_failures.len(), 1);
        assert_eq!(
            r.batch_item_failures[0].item_identifier.as_deref(),
            Some("2")
        );
    }
}

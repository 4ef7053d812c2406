//! Integration tests: one binary, against the real RabbitMQ on 127.0.0.1:5672 (management API on
//! 15672) and PostgreSQL on 127.0.0.1:5432. Each test owns a fresh vhost or database, removed
//! when the test ends, so tests run in parallel and twice in a row.

mod abuse;
mod alerting;
mod alipay;
mod cli;
mod cluster;
mod cluster_faults;
mod compose;
mod deploy;
mod downstream;
mod faults;
mod gate;
mod hostile;
mod ingress;
mod logs;
mod observability;
mod pg_failover;
mod pipeline_e2e;
mod scaling;
mod store;
mod support;
mod topology;
mod verify;
mod wechatpay;
mod worker;

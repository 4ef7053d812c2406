//! A PostgreSQL database of its own for one test, dropped on drop.

use ipn_bridge::config;
use sqlx::{ConnectOptions, Connection};

/// Server the tests use (trust auth, user postgres).
pub const POSTGRES: &str = "127.0.0.1:5432";
const SERVER: &str = "postgres://postgres@127.0.0.1:5432";

/// A database name no other test uses; the store creates it on first connect.
pub struct TestDb {
    name: String,
}

impl TestDb {
    /// Picks a fresh name (the database itself is created by `Store::connect`).
    pub fn new() -> TestDb {
        TestDb {
            name: format!("it_{}", uuid::Uuid::now_v7().simple()),
        }
    }

    /// The URL of this test's database through `address` (the server itself, or a proxy).
    pub fn url_via(&self, address: &str) -> String {
        format!("postgres://postgres@{address}/{}", self.name)
    }

    /// A database config pointing at this test's database.
    pub fn config(&self) -> config::Database {
        config::Database {
            url: format!("{SERVER}/{}", self.name)
                .parse()
                .expect("valid url"),
            max_connections: std::num::NonZeroU32::new(4).expect("non-zero"),
            ..config::Database::default()
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop cannot await: use a thread with a runtime of its own, as TestBroker does.
        let dropped = std::thread::spawn(move || -> Result<(), sqlx::Error> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(sqlx::Error::Io)?;
            let drop = async {
                let options: sqlx::postgres::PgConnectOptions =
                    format!("{SERVER}/postgres").parse()?;
                let mut connection = options.connect().await?;
                let statement = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                sqlx::query(sqlx::AssertSqlSafe(statement))
                    .execute(&mut connection)
                    .await?;
                connection.close().await
            };
            // Bounded, like every wait here: a server that stopped answering leaves the
            // database behind (reported below) rather than hanging the test run.
            runtime.block_on(async {
                tokio::time::timeout(super::PATIENCE * 3, drop)
                    .await
                    .map_err(|_| {
                        let timed_out = std::io::ErrorKind::TimedOut;
                        sqlx::Error::Io(std::io::Error::new(timed_out, "no answer in time"))
                    })?
            })
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(error)) => eprintln!("could not drop test database {}: {error}", self.name),
            Err(_) => eprintln!("could not drop test database {}: panicked", self.name),
        }
    }
}

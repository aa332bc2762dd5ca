//! A fresh PostgreSQL database per test, on the server named by
//! `QUOTAWATCH_TEST_DATABASE_URL`. Without it, tests that need PostgreSQL say
//! they are skipped and pass.

use sqlx::Connection;
use sqlx::postgres::PgConnection;

pub struct TestDatabase {
    pub url: String,
    admin_url: String,
    name: String,
}

/// The server to use, or `None` after printing why the caller is skipped.
pub fn server_url(test: &str) -> Option<String> {
    match std::env::var("QUOTAWATCH_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            println!(
                "skipped: {test} needs PostgreSQL; set QUOTAWATCH_TEST_DATABASE_URL=postgres://..."
            );
            None
        }
    }
}

fn with_database(url: &str, name: &str) -> String {
    let (base, _) = url
        .rsplit_once('/')
        .expect("a postgres URL ends in /database");
    format!("{base}/{name}")
}

impl TestDatabase {
    pub async fn create(test: &str) -> Option<Self> {
        let admin_url = server_url(test)?;
        let name = format!("qw_test_{}", hex_id());
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .expect("connect to QUOTAWATCH_TEST_DATABASE_URL");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("create a test database");
        Some(Self {
            url: with_database(&admin_url, &name),
            admin_url,
            name,
        })
    }

    pub async fn drop_database(self) {
        if let Ok(mut admin) = PgConnection::connect(&self.admin_url).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&mut admin)
            .await;
        }
    }
}

fn hex_id() -> String {
    let bytes: [u8; 6] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

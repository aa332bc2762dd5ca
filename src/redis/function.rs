//! The counters as a Redis function library (`FUNCTION LOAD`, `FCALL`):
//! loaded into Redis once, so that the helpers `counters.lua` defines are
//! made once rather than at every call, as a script's are; that cost more
//! than a small call's own work. A call loads the library first when Redis
//! does not know its function: a Redis that restarted, or the first call of
//! a new version.

use redis::aio::ConnectionManager;
use redis::{Cmd, RedisError, RedisResult, ToRedisArgs, Value};
use sha2::{Digest, Sha256};

/// The name `counters.lua` registers its function under.
pub(super) const FUNCTION_MARKER: &str = "@FUNCTION@";

/// A library of one function, named after its code, so that instances of
/// two versions (during an upgrade) each call their own.
pub(super) struct Library {
    code: String,
    function: String,
}

impl Library {
    pub(super) fn new(source: &str) -> Self {
        let digest = hex::encode(&Sha256::digest(source.as_bytes())[..8]);
        let function = format!("quotawatch_counters_{digest}");
        let code = format!(
            "#!lua name=quotawatch_{digest}\n{}",
            source.replace(FUNCTION_MARKER, &function)
        );
        Self { code, function }
    }

    /// Calls the function with `call`'s keys and arguments.
    pub(super) async fn invoke(
        &self,
        call: &Call,
        connection: &mut ConnectionManager,
    ) -> RedisResult<Value> {
        let command = call.command(&self.function);
        match command.query_async(connection).await {
            Err(error) if unknown_function(&error) => {
                self.load(connection).await?;
                command.query_async(connection).await
            }
            answer => answer,
        }
    }

    /// Loads the library; one loaded meanwhile by another instance is the
    /// same code, by its name.
    async fn load(&self, connection: &mut ConnectionManager) -> RedisResult<()> {
        let loaded: RedisResult<Value> = redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg(&self.code)
            .query_async(connection)
            .await;
        match loaded {
            Err(error) if already_loaded(&error) => Ok(()),
            loaded => loaded.map(drop),
        }
    }
}

fn unknown_function(error: &RedisError) -> bool {
    error
        .detail()
        .is_some_and(|detail| detail.starts_with("Function not found"))
}

fn already_loaded(error: &RedisError) -> bool {
    error
        .detail()
        .is_some_and(|detail| detail.contains("already exists"))
}

/// A call's keys and arguments, gathered in any order (a batch names each
/// workspace's key as it describes the workspace) and sent keys first.
#[derive(Default)]
pub(super) struct Call {
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl Call {
    pub(super) fn key(&mut self, key: impl ToRedisArgs) -> &mut Self {
        key.write_redis_args(&mut self.keys);
        self
    }

    pub(super) fn arg(&mut self, arg: impl ToRedisArgs) -> &mut Self {
        arg.write_redis_args(&mut self.args);
        self
    }

    fn command(&self, function: &str) -> Cmd {
        let mut command = redis::cmd("FCALL");
        command
            .arg(function)
            .arg(self.keys.len())
            .arg(&self.keys)
            .arg(&self.args);
        command
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_library_and_its_function_are_named_after_the_code() {
        let source = "redis.register_function('@FUNCTION@', function() return 1 end)";
        let library = Library::new(source);
        assert!(library.function.starts_with("quotawatch_counters_"));
        assert!(library.code.starts_with("#!lua name=quotawatch_"));
        assert!(library.code.contains(&format!("'{}'", library.function)));
        let changed = Library::new(&format!("{source}\n-- changed"));
        assert_ne!(changed.function, library.function);
    }

    #[test]
    fn keys_go_before_arguments_whatever_the_order_they_came_in() {
        let mut call = Call::default();
        call.arg("batch").key("a").arg(7).key("b");
        let command = call.command("f");
        let sent: Vec<Vec<u8>> = command
            .args_iter()
            .map(|arg| match arg {
                redis::Arg::Simple(bytes) => bytes.to_vec(),
                _ => b"(not a plain argument)".to_vec(),
            })
            .collect();
        let expected: Vec<&[u8]> = vec![b"FCALL", b"f", b"2", b"a", b"b", b"batch", b"7"];
        assert_eq!(sent, expected);
    }
}

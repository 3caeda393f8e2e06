//! Arbitrary text as proxy.toml: `Config::parse` answers Ok or Err, never panics, and what it
//! accepts can be compiled into everything the proxy builds from a config.

#![no_main]

use cutover_proxy::core::breaker::BreakerSettings;
use cutover_proxy::core::config::Config;
use cutover_proxy::core::identity::Verifier;
use cutover_proxy::core::routing::Rollout;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match Config::parse(&text) {
        Ok(config) => {
            config
                .validate()
                .expect("parse returned a config that does not validate");
            assert!(config.restart_only_changes(&config).is_empty());
            let _ = BreakerSettings::from_config(&config);
            let rollout = Rollout::new(&config.rollout);
            for org in config
                .rollout
                .runtime_orgs
                .iter()
                .chain(&config.rollout.direct_orgs)
            {
                assert!(rollout.names(org));
                let _ = rollout.decide(Some(org));
            }
            let _ = Verifier::new(&config.identity, Some("fuzz-secret"));
            let _ = config.runtime.execution_timeout();
        }
        Err(e) => {
            // The message names a key or is about the file itself; rendering never panics.
            let _ = e.to_string();
        }
    }
});

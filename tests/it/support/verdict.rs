//! Scoring one fault the way failoverbench scores a cell (methodology v0.1), translated to this
//! product: the runtime is the primary, legacy the fallback, and the caller is the web app
//! reading a chat's event stream.
//!
//! - **pass**: rescued (the caller got a whole answer, ending in `done`, with no `error`
//!   event) and every check clean;
//! - **partial**: rescued, but an advisory check failed;
//! - **safe**: not rescued, but the call ended with a bounded, clean error (one `error` event,
//!   then a properly ended stream) and every required check passed;
//! - **fail**: a required check failed, a hang, or a truncated answer presented as a success.

use std::fmt;

use super::client::Response;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Partial,
    Safe,
    Fail,
}

/// What a fault scenario saw, and the checks it holds the proxy to.
#[derive(Debug, Default)]
pub struct Scored {
    pub rescued: bool,
    pub clean_error: bool,
    checks: Vec<(&'static str, bool, bool)>,
}

impl Scored {
    /// Judge the caller's response: rescued, or ended with one clean error.
    pub fn of(r: &Response) -> Scored {
        let events = if r.status == 200 && r.complete {
            r.events()
        } else {
            Vec::new()
        };
        let errors = events.iter().filter(|(e, _)| e == "error").count();
        let done = events.last().is_some_and(|(e, _)| e == "done");
        let rescued = done && errors == 0;
        let clean_error = (errors == 1 && events.last().is_some_and(|(e, _)| e == "error"))
            || (r.complete && r.status >= 400);
        let mut scored = Scored {
            rescued,
            clean_error,
            checks: Vec::new(),
        };
        // A stream that says `done` and also carries an error, or ends without either, is a
        // truncated answer presented as a success.
        let truncated_success =
            (done && errors > 0) || (r.status == 200 && r.complete && !done && errors == 0);
        scored.required("no_truncated_success", !truncated_success);
        scored
    }

    /// A check whose failure fails the scenario.
    pub fn required(&mut self, name: &'static str, ok: bool) -> &mut Self {
        self.checks.push((name, ok, true));
        self
    }

    /// A check whose failure only makes a rescue partial.
    pub fn advisory(&mut self, name: &'static str, ok: bool) -> &mut Self {
        self.checks.push((name, ok, false));
        self
    }

    pub fn verdict(&self) -> Verdict {
        if self.checks.iter().any(|(_, ok, required)| *required && !ok) {
            return Verdict::Fail;
        }
        match (self.rescued, self.clean_error) {
            (true, _) if self.checks.iter().all(|(_, ok, _)| *ok) => Verdict::Pass,
            (true, _) => Verdict::Partial,
            (false, true) => Verdict::Safe,
            (false, false) => Verdict::Fail,
        }
    }
}

impl fmt::Display for Scored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} (rescued: {}, clean error: {}",
            self.verdict(),
            self.rescued,
            self.clean_error
        )?;
        for (name, ok, required) in &self.checks {
            let kind = if *required { "required" } else { "advisory" };
            write!(
                f,
                ", {name} [{kind}]: {}",
                if *ok { "ok" } else { "FAILED" }
            )?;
        }
        write!(f, ")")
    }
}

//! One runtime execution as the relay and a detached execution both see it: its settings, the
//! conversation bridge's part, and the save of its answer.

use std::time::{Duration, Instant};

use crate::core::agent2ui::{Completion, MapSettings, StreamMapper};
use crate::core::bridge::AssistantMessage;
use crate::core::config::{CommitOn, CommitTimeoutAction};
use crate::core::cors::CorsHeaders;
use crate::core::routing::RolloutDecision;
use crate::state::Shared;
use crate::upstream::bridge::{Bridge, Credentials, Persisted, Target};

/// Everything the relay loop needs besides the client session.
pub struct RelayArgs {
    pub shared: std::sync::Arc<Shared>,
    pub decision: RolloutDecision,
    /// The CORS headers of the client's response head.
    pub cors: CorsHeaders,
    pub session_id: String,
    pub started: Instant,
    pub deadline: Instant,
    pub heartbeat: Duration,
    pub max_frame_bytes: usize,
    pub commit_on: CommitOn,
    /// From the runtime's response head; zero: committed at the head.
    pub commit_timeout: Duration,
    /// What the commit timeout does when no content came by then.
    pub commit_timeout_action: CommitTimeoutAction,
    /// The client event cap and the stream org's file link signer.
    pub map: MapSettings,
    /// Where the user's message and the answer are saved, with the bridge on. Boxed, as is
    /// `rescue`: a stream without it then carries a pointer, not the whole of it, for as long
    /// as it lasts.
    pub saving: Option<Box<Saving>>,
    /// `runtime.pre_content = "stream"`: the head goes out with the runtime's, and a failure
    /// before content is rescued in the open stream with this request to legacy. `None`: the
    /// head is held until the commit (`"hold"`).
    /// Dropped at the commit.
    pub rescue: Option<Box<crate::runtime::rescue::Rescue>>,
}

/// The conversation bridge's part of a relay: legacy saves the user's message from the commit
/// on (it completes before the first client event is written) and the runtime's answer before
/// `done`.
pub struct Saving {
    pub bridge: std::sync::Arc<Bridge>,
    pub target: std::sync::Arc<Target>,
    pub who: Credentials,
    /// Moved into its save at the commit: a long stream does not keep the question.
    pub message: String,
    pub parent_id: Option<String>,
    /// The session's last message when the chat began: what this chat saves comes after it.
    pub after: Option<String>,
    /// `bridge.max_detached` with `bridge.finish_detached` on: a client that leaves after the
    /// commit still gets its answer saved (`detached`).
    pub detach: Option<usize>,
}

/// `done.messageId`: the id legacy saved the answer under (the proxy's own while the save is
/// retried in the background), or with the bridge off the stream's own id.
pub async fn save_answer(
    args: &RelayArgs,
    mapper: &mut StreamMapper,
    completion: &Completion,
    latency_ms: u64,
) -> String {
    let Some(saving) = &args.saving else {
        return mapper.message_id().to_string();
    };
    let answer = AssistantMessage::new(
        &completion.final_response,
        &mapper.take_text(),
        completion.tokens,
        latency_ms,
    );
    let persisted = saving
        .bridge
        .persist_assistant(
            &saving.target,
            &saving.who,
            &args.session_id,
            answer,
            saving.after.clone(),
        )
        .await;
    match persisted {
        Persisted::Saved(id) => id,
        Persisted::Deferred { message_id, .. } => message_id,
    }
}

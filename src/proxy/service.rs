//! The chat service: what the proxy does with a chat request on either connection (the front
//! door's own, or Pingora's `Session`, both through `Downstream`). There is one for the whole
//! proxy, held by Pingora's `ProxyHttp` (`CutoverProxy`) and by the front door. Its parts, each
//! in its own module: who asks and how the chat is routed, the runtime path and shadow copies
//! of legacy chats (`serve`: `serve_chat`, `serve_runtime`, `shadow_legacy`), the answers the
//! proxy gives itself (`respond`: `refuse`), the file links (`files`), and the one count of a
//! finished request (`record`, with a [`Finish`](super::record::Finish) of its own rather than
//! Pingora's error).

use std::sync::Arc;

use crate::state::Shared;

/// The chat service; its methods are in the modules named above.
pub struct ChatService {
    pub(super) shared: Arc<Shared>,
}

impl ChatService {
    pub fn new(shared: Arc<Shared>) -> Self {
        ChatService { shared }
    }
}

/// Where a chat request went.
pub(super) enum Chat {
    /// The proxy answered it: a runtime stream or a refusal.
    Answered,
    /// Legacy serves it; `shadow`: it was routed there, so a shadow copy may run.
    Legacy { shadow: bool },
}

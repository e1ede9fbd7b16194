//! Who may call: the callers file and its tokens, and the layer that admits only the callers
//! it lists, in a role that may make the call.

mod authenticate;
mod callers;
mod live;

pub(crate) use authenticate::Authenticate;
pub use callers::{
    Caller, CallerRole, CallerToken, Callers, CallersFileError, check_name, file_line,
    new_token_instructions,
};
pub(crate) use live::LiveCallers;
pub use live::ReloadError;

//! The console's static files, compiled into the binary (no build step, nothing to deploy
//! beside it): one style sheet and one script. The script is served from `/static/`, as the
//! Content-Security-Policy (`script-src 'self'`) demands: no page has an inline script.

/// `console.css`.
pub const CSS: &str = include_str!("static/console.css");
/// `console.js`.
pub const JS: &str = include_str!("static/console.js");

//! The viewer page at `/ui`: plain HTML, CSS and JavaScript compiled into the binary, so it needs no files and
//! no network at run time.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::http::SharedState;

const INDEX: &str = include_str!("../../ui/index.html");
const SCRIPT: &str = include_str!("../../ui/app.js");
const STYLE: &str = include_str!("../../ui/app.css");

pub fn routes(router: Router<SharedState>) -> Router<SharedState> {
    router
        .route("/ui", get(|| page(INDEX, "text/html; charset=utf-8")))
        .route("/ui/", get(|| page(INDEX, "text/html; charset=utf-8")))
        .route(
            "/ui/app.js",
            get(|| page(SCRIPT, "text/javascript; charset=utf-8")),
        )
        .route(
            "/ui/app.css",
            get(|| page(STYLE, "text/css; charset=utf-8")),
        )
}

async fn page(body: &'static str, content_type: &'static str) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, content_type)], body)
}

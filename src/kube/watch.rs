//! The Kubernetes client's watches, under `kube::Client::watch_*`: one kind's objects (as a
//! selector picks them) listed, then followed, as a stream of events that resumes by itself:
//! a watch the server ends is resumed from the last resource version, a 410 Gone re-lists,
//! an error is yielded and retried after a growing pause.
//!
//! In place of kube-runtime's watcher, for memory: that one holds an 8 KiB line buffer and a
//! ~7 KiB state machine per watch for the watch's whole life, and the sidecar holds two
//! watches per Service in use (heaptrack, issue 24: ~30 of the ~60 KiB each Service cost).
//! Here an idle watch holds no buffer (a chunk's whole lines are parsed where they arrived;
//! only a line split across chunks is copied, and that copy is freed once the line is whole)
//! and the request futures, boxed, exist only while a request is in flight.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use kube::api::{ListParams, WatchEvent, WatchParams};
use kube::client::Body;
use kube::{Api, Resource};
use serde::de::DeserializeOwned;

use super::KubeError;

/// One change among the watched objects.
#[derive(Debug)]
pub enum Event<K> {
    /// A (re-)list starts: the objects listed until `Listed` are all there are.
    Restarting,
    /// An object, listed or added or changed.
    Applied(K),
    /// The list is complete.
    Listed,
    Deleted(K),
}

/// How long the API server keeps one watch request open (it ends it then; it is resumed).
const WATCH_SECONDS: u32 = 290;
/// The longest watch event line kept: etcd refuses objects past 1.5 MiB; a longer line is an
/// error (and a re-list), never unbounded memory.
const MAX_LINE: usize = 4 << 20;
const FIRST_PAUSE: Duration = Duration::from_millis(500);
const LONGEST_PAUSE: Duration = Duration::from_secs(30);

/// What to watch: a kind (by `api`), narrowed by selectors; listed `page` objects at a time.
pub struct Selection {
    pub labels: Option<String>,
    pub fields: Option<String>,
    pub page: Option<u32>,
}

/// `api`'s objects as `selection` picks them, listed and then followed.
pub fn watch<K>(
    api: Api<K>,
    selection: Selection,
) -> impl futures_util::Stream<Item = Result<Event<K>, KubeError>> + Send + 'static
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let state = Watch {
        api,
        selection,
        phase: Phase::List { after: None },
        ready: VecDeque::new(),
        pause: FIRST_PAUSE,
    };
    futures_util::stream::unfold(state, |mut state| async move {
        let item = state.step().await;
        Some((item, state))
    })
}

struct Watch<K> {
    api: Api<K>,
    selection: Selection,
    phase: Phase,
    /// Events read and not yet handed out (a listed page, a chunk's lines).
    ready: VecDeque<Event<K>>,
    /// The pause before the next retry; doubled by each failure, reset by a success.
    pause: Duration,
}

enum Phase {
    /// List (the page after `after`, or from the start).
    List { after: Option<String> },
    /// Start a watch from `version`.
    Watch { version: String },
    /// Read the watch's response.
    Reading {
        version: String,
        body: Body,
        partial: BytesMut,
    },
    /// Pause, then `then`.
    Pause { then: Box<Phase> },
}

impl<K> Watch<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    /// The next event, or the error that interrupted the watch (retried after a pause).
    async fn step(&mut self) -> Result<Event<K>, KubeError> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Ok(event);
            }
            match std::mem::replace(&mut self.phase, Phase::List { after: None }) {
                Phase::Pause { then } => {
                    tokio::time::sleep(self.pause).await;
                    self.pause = (self.pause * 2).min(LONGEST_PAUSE);
                    self.phase = *then;
                }
                Phase::List { after } => {
                    let params = self.list_params(after.as_deref());
                    let list = match Box::pin(self.api.list(&params)).await {
                        Ok(list) => list,
                        Err(e) => return Err(self.failed(e.into(), Phase::List { after: None })),
                    };
                    self.pause = FIRST_PAUSE;
                    if after.is_none() {
                        self.ready.push_back(Event::Restarting);
                    }
                    self.ready
                        .extend(list.items.into_iter().map(Event::Applied));
                    self.phase = match list.metadata.continue_.filter(|c| !c.is_empty()) {
                        Some(after) => Phase::List { after: Some(after) },
                        None => {
                            self.ready.push_back(Event::Listed);
                            Phase::Watch {
                                version: list.metadata.resource_version.unwrap_or_default(),
                            }
                        }
                    };
                }
                Phase::Watch { version } => match start_watch(&self.api, &self.selection, &version)
                    .await
                {
                    Ok(body) => {
                        self.pause = FIRST_PAUSE;
                        self.phase = Phase::Reading {
                            version,
                            body,
                            partial: BytesMut::new(),
                        };
                    }
                    // Too old to resume from: list again, at once.
                    Err(Stopped::Gone) => self.phase = Phase::List { after: None },
                    Err(Stopped::Error(e)) => return Err(self.failed(e, Phase::Watch { version })),
                },
                Phase::Reading {
                    mut version,
                    mut body,
                    mut partial,
                } => match body.frame().await {
                    // The server ended the watch (its timeout): resume where it was.
                    None => self.phase = Phase::Watch { version },
                    Some(Err(e)) => {
                        let e = KubeError::Unreachable(format!("watch: {e}"));
                        return Err(self.failed(e, Phase::Watch { version }));
                    }
                    Some(Ok(frame)) => {
                        let Ok(chunk) = frame.into_data() else {
                            self.phase = Phase::Reading {
                                version,
                                body,
                                partial,
                            };
                            continue;
                        };
                        match self.read(&mut version, &mut partial, chunk) {
                            Ok(()) => {
                                self.phase = Phase::Reading {
                                    version,
                                    body,
                                    partial,
                                }
                            }
                            Err(Stopped::Gone) => self.phase = Phase::List { after: None },
                            Err(Stopped::Error(e)) => {
                                return Err(self.failed(e, Phase::List { after: None }))
                            }
                        }
                    }
                },
            }
        }
    }

    fn list_params(&self, after: Option<&str>) -> ListParams {
        let mut params = ListParams::default();
        if let Some(labels) = &self.selection.labels {
            params = params.labels(labels);
        }
        if let Some(fields) = &self.selection.fields {
            params = params.fields(fields);
        }
        if let Some(page) = self.selection.page {
            params = params.limit(page);
        }
        if let Some(after) = after {
            params = params.continue_token(after);
        }
        params
    }

    /// The events in `chunk`, and in a line `partial` began; `version` follows them.
    fn read(
        &mut self,
        version: &mut String,
        partial: &mut BytesMut,
        chunk: Bytes,
    ) -> Result<(), Stopped> {
        lines(partial, chunk, |line| self.event(version, line))
    }

    fn event(&mut self, version: &mut String, line: &[u8]) -> Result<(), Stopped> {
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        let event: WatchEvent<K> = serde_json::from_slice(line).map_err(|e| {
            Stopped::Error(KubeError::Unreachable(format!(
                "watch: unreadable event: {e}"
            )))
        })?;
        let seen = |object: &K, version: &mut String| {
            if let Some(v) = &object.meta().resource_version {
                v.clone_into(version);
            }
        };
        match event {
            WatchEvent::Added(object) | WatchEvent::Modified(object) => {
                seen(&object, version);
                self.ready.push_back(Event::Applied(object));
            }
            WatchEvent::Deleted(object) => {
                seen(&object, version);
                self.ready.push_back(Event::Deleted(object));
            }
            WatchEvent::Bookmark(bookmark) => *version = bookmark.metadata.resource_version,
            WatchEvent::Error(status) if status.code == 410 => return Err(Stopped::Gone),
            WatchEvent::Error(status) => {
                let message = format!("watch: {} ({})", status.message, status.code);
                return Err(Stopped::Error(match status.code {
                    401 | 403 => KubeError::Forbidden(message),
                    _ => KubeError::Unreachable(message),
                }));
            }
        }
        Ok(())
    }

    /// `e` is yielded; after a pause, `then`.
    fn failed(&mut self, e: KubeError, then: Phase) -> KubeError {
        self.phase = Phase::Pause {
            then: Box::new(then),
        };
        e
    }
}

/// Asks for the changes after `version`; the response body carries them, one per line.
async fn start_watch<K: Resource + Clone>(
    api: &Api<K>,
    selection: &Selection,
    version: &str,
) -> Result<Body, Stopped> {
    let params = WatchParams {
        label_selector: selection.labels.clone(),
        field_selector: selection.fields.clone(),
        timeout: Some(WATCH_SECONDS),
        bookmarks: true,
        ..WatchParams::default()
    };
    let request = kube::core::Request::new(api.resource_url())
        .watch(&params, version)
        .map_err(|e| Stopped::Error(KubeError::Config(e.to_string())))?;
    let client = api.clone().into_client();
    let response = Box::pin(client.send(request.map(Body::from)))
        .await
        .map_err(|e| Stopped::Error(e.into()))?;
    let status = response.status();
    if status.is_success() {
        return Ok(response.into_body());
    }
    let code = status.as_u16();
    let message = format!("watch: HTTP {code}");
    Err(match code {
        410 => Stopped::Gone,
        401 | 403 => Stopped::Error(KubeError::Forbidden(message)),
        _ => Stopped::Error(KubeError::Unreachable(message)),
    })
}

/// Hands `each` every whole line of `chunk` (the first one completing the line `partial`
/// began), and keeps the unfinished tail in `partial`. Whole lines are read where they lie;
/// `partial` is freed once its line is whole, so an idle watch holds no buffer.
fn lines(
    partial: &mut BytesMut,
    mut chunk: Bytes,
    mut each: impl FnMut(&[u8]) -> Result<(), Stopped>,
) -> Result<(), Stopped> {
    if !partial.is_empty() {
        let Some(end) = chunk.iter().position(|b| *b == b'\n') else {
            if partial.len() + chunk.len() > MAX_LINE {
                return Err(too_long());
            }
            partial.extend_from_slice(&chunk);
            return Ok(());
        };
        partial.extend_from_slice(&chunk[..end]);
        chunk.advance(end + 1);
        let line = std::mem::take(partial);
        each(&line)?;
    }
    while let Some(end) = chunk.iter().position(|b| *b == b'\n') {
        each(&chunk[..end])?;
        chunk.advance(end + 1);
    }
    if chunk.len() > MAX_LINE {
        return Err(too_long());
    }
    partial.extend_from_slice(&chunk);
    Ok(())
}

/// Why a watch stopped reading.
enum Stopped {
    /// 410 Gone: the version is too old to resume from; list again.
    Gone,
    Error(KubeError),
}

fn too_long() -> Stopped {
    Stopped::Error(KubeError::Unreachable(format!(
        "watch: an event line longer than {MAX_LINE} bytes"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn feed(chunks: &[&[u8]]) -> (Vec<Vec<u8>>, BytesMut) {
        let mut partial = BytesMut::new();
        let mut seen = Vec::new();
        for c in chunks {
            lines(&mut partial, Bytes::copy_from_slice(c), |l| {
                seen.push(l.to_vec());
                Ok(())
            })
            .map_err(|_| "stopped")
            .unwrap();
        }
        (seen, partial)
    }

    proptest! {
        /// However the server's chunks cut the event lines, each line arrives whole, once,
        /// in order; and once the last line is whole no buffer is held.
        #[test]
        fn lines_arrive_whole_however_the_chunks_cut_them(
            events in proptest::collection::vec("[a-z{}\":,]{0,40}", 1..8),
            cuts in proptest::collection::vec(0usize..400, 0..6),
        ) {
            let text: Vec<u8> = events.iter().flat_map(|e| format!("{e}\n").into_bytes()).collect();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (text.len() + 1)).collect();
            cuts.push(0);
            cuts.push(text.len());
            cuts.sort_unstable();
            let chunks: Vec<&[u8]> = cuts.windows(2).map(|w| &text[w[0]..w[1]]).collect();
            let (seen, partial) = feed(&chunks);
            let want: Vec<Vec<u8>> = events.iter().map(|e| e.as_bytes().to_vec()).collect();
            prop_assert_eq!(seen, want);
            prop_assert_eq!(partial.capacity(), 0);
        }
    }

    #[test]
    fn a_line_longer_than_the_limit_stops_the_watch() {
        let mut partial = BytesMut::new();
        let big = Bytes::from(vec![b'x'; MAX_LINE / 2 + 1]);
        assert!(lines(&mut partial, big.clone(), |_| Ok(())).is_ok());
        assert!(lines(&mut partial, big, |_| Ok(())).is_err());
    }
}

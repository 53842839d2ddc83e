//! Kubernetes Events on the objects the Kubernetes source rejects, so `kubectl describe` and
//! `kubectl get events` show why Comb left an object out (or kept its last good version)
//! next to the object itself. One Event per object version and message: a resync or another
//! agent's build does not repeat it (kube-runtime's Recorder also folds repeats into a
//! series). Writing an Event never blocks the source and its failure is only logged: Events
//! are a report, not State.

use std::collections::HashSet;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use super::kube_store::Rejection;

/// Kubernetes limits an Event's note to 1 kB.
const NOTE_MAX: usize = 1024;
pub const REASON: &str = "CombRejected";

pub struct EventReporter {
    recorder: Recorder,
    /// (uid, resourceVersion, message) already reported.
    reported: HashSet<(String, String, String)>,
}

/// The Event's note: the located errors, cut to the limit at a character boundary.
pub fn note(message: &str) -> String {
    if message.len() <= NOTE_MAX {
        return message.to_owned();
    }
    let mut end = NOTE_MAX - 3;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &message[..end])
}

pub fn reference(r: &Rejection) -> ObjectReference {
    ObjectReference {
        api_version: Some(r.api_version.clone()),
        kind: Some(r.kind.to_owned()),
        name: Some(r.name.clone()),
        namespace: (!r.namespace.is_empty()).then(|| r.namespace.clone()),
        uid: (!r.uid.is_empty()).then(|| r.uid.clone()),
        resource_version: (!r.resource_version.is_empty()).then(|| r.resource_version.clone()),
        field_path: None,
    }
}

impl EventReporter {
    /// Events written as `comb-agent` from `node`.
    pub fn new(client: kube::Client, node: &str) -> Self {
        let reporter = Reporter {
            controller: "comb-agent".into(),
            instance: Some(node.to_owned()),
        };
        EventReporter {
            recorder: Recorder::new(client, reporter),
            reported: HashSet::new(),
        }
    }

    /// Publish an Event for each rejection not reported before (in the background).
    pub fn report(&mut self, rejections: &[Rejection]) {
        let current: HashSet<(String, String, String)> = rejections
            .iter()
            .map(|r| (r.uid.clone(), r.resource_version.clone(), r.message.clone()))
            .collect();
        for r in rejections {
            let key = (r.uid.clone(), r.resource_version.clone(), r.message.clone());
            if self.reported.contains(&key) {
                continue;
            }
            let recorder = self.recorder.clone();
            let event = Event {
                type_: EventType::Warning,
                reason: REASON.into(),
                note: Some(note(&r.message)),
                action: "Validate".into(),
                secondary: None,
            };
            let reference = reference(r);
            let what = format!("{} {}/{}", r.kind, r.namespace, r.name);
            tokio::spawn(async move {
                if let Err(e) = recorder.publish(&event, &reference).await {
                    tracing::warn!(object = %what, error = %e, "could not record a Kubernetes Event");
                }
            });
        }
        // Forget what is no longer rejected: the object was fixed or deleted.
        self.reported = current;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_note_fits_the_limit() {
        assert_eq!(note("short"), "short");
        let long = "é".repeat(700);
        let n = note(&long);
        assert!(n.len() <= NOTE_MAX, "{}", n.len());
        assert!(n.ends_with("..."));
    }

    #[test]
    fn the_reference_names_the_object_version() {
        let r = Rejection {
            api_version: "v1".into(),
            kind: "Service",
            namespace: "apps".into(),
            name: "web".into(),
            uid: "u1".into(),
            resource_version: "42".into(),
            message: "bad".into(),
        };
        let o = reference(&r);
        assert_eq!(o.kind.as_deref(), Some("Service"));
        assert_eq!(o.namespace.as_deref(), Some("apps"));
        assert_eq!(o.resource_version.as_deref(), Some("42"));
        let cluster = Rejection {
            namespace: String::new(),
            kind: "Namespace",
            ..r
        };
        assert_eq!(reference(&cluster).namespace, None);
    }
}

//! Reminders, grouped: the flows of one service that fail alike are told
//! of in one record a reminder interval (a redeploy can pin thousands).

use std::{collections::HashMap, time::Duration};

use crate::domain::{Alert, Backend, Service, Tuple, Verdict};

/// Flows of a group whose entries its record names in its fix, at most:
/// beyond, `--fix` deletes each as it is judged.
pub const LISTED: usize = 16;

/// Reminders gathered over one round of the watch loop, grouped by
/// namespace, service, verdict and stale backend.
#[derive(Debug, Default)]
pub struct Reminders {
    groups: HashMap<ReminderKey, ReminderGroup>,
}

/// Namespace, service, verdict and stale backend.
type ReminderKey = (u32, Service, Verdict, Backend);

/// Reminders of flows that fail alike: the first one, and the sums.
#[derive(Debug)]
pub struct ReminderGroup {
    pub alert: Alert,
    pub flows: u32,
    pub packets: u64,
    /// The earliest first failure and the latest failure (monotonic).
    pub first: Duration,
    pub last: Duration,
    /// The original and reply tuples of the group's first [`LISTED`]
    /// flows: the entries judged, which its fix names one by one.
    pub members: Vec<(Tuple, Tuple)>,
}

impl Reminders {
    pub fn add(&mut self, alert: &Alert) {
        let f = &alert.flow;
        let key = (f.netns, f.orig.service(), alert.verdict, f.backend());
        let packets = u64::from(f.failures());
        match self.groups.get_mut(&key) {
            Some(g) => {
                g.flows += 1;
                g.packets += packets;
                g.first = g.first.min(f.first);
                g.last = g.last.max(f.last);
                if g.members.len() < LISTED {
                    g.members.push((f.orig, f.reply));
                }
            }
            None => {
                self.groups.insert(
                    key,
                    ReminderGroup {
                        alert: alert.clone(),
                        flows: 1,
                        packets,
                        first: f.first,
                        last: f.last,
                        members: vec![(f.orig, f.reply)],
                    },
                );
            }
        }
    }

    /// The groups gathered, in a stable order, leaving none.
    pub fn take(&mut self) -> Vec<ReminderGroup> {
        let mut groups: Vec<(ReminderKey, ReminderGroup)> = self.groups.drain().collect();
        groups.sort_by_key(|(key, _)| *key);
        groups.into_iter().map(|(_, g)| g).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::fixtures::reminder;

    #[test]
    fn reminders_of_one_service_pinned_alike_make_one_group() {
        let mut reminders = Reminders::default();
        reminders.add(&reminder(40000, 10, 50, 98));
        reminders.add(&reminder(40001, 20, 40, 99));
        reminders.add(&reminder(40002, 30, 60, 97));
        // Pinned elsewhere, or judged otherwise: groups of their own.
        let mut elsewhere = reminder(40003, 5, 70, 90);
        elsewhere.flow.reply.src = "172.17.0.9".parse().unwrap();
        reminders.add(&elsewhere);
        let mut down = reminder(40004, 5, 70, 90);
        down.verdict = Verdict::BackendDown;
        reminders.add(&down);

        let groups = reminders.take();
        assert_eq!(groups.len(), 3);
        let three = groups.iter().find(|g| g.flows == 3).unwrap();
        assert_eq!(three.packets, 60);
        assert_eq!(three.first, Duration::from_secs(40));
        assert_eq!(three.last, Duration::from_secs(99));
        assert_eq!(three.alert.flow.orig.sport, 40000);
        let sports: Vec<u16> = three.members.iter().map(|(o, _)| o.sport).collect();
        assert_eq!(sports, [40000, 40001, 40002]);
        assert!(groups.iter().filter(|g| g.flows == 1).count() == 2);
        assert!(reminders.take().is_empty(), "take leaves nothing behind");
    }
}

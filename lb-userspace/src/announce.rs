//! Placeholder: VIP addresses and their announcements.

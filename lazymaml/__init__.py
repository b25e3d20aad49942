"""lazymaml — the lazy (teacher–student leap) meta-gradient of Jamal, Wang & Gong (ICCV 2021)."""

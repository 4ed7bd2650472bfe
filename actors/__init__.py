"""Ray process roles of tvkd-ray: teacher and reference inference actors, the student train loop."""

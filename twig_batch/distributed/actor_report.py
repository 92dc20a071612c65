"""What an actor tells the driver besides its rows: when it was ready, its part size, the kernels
it runs uncompiled, and every part that ran out of memory or failed.

The events ride in one extra text column of the actor's output (`actor_events`, JSON on the first
row of a table, null elsewhere), so they arrive in order with the rows and need no other channel.
The driver takes the column off before the rows are journalled (`detach_events`).
"""
from __future__ import annotations

import json

import pyarrow as pa

EVENTS_COLUMN = "actor_events"


def attach_events(table: pa.Table, events: list[dict]) -> pa.Table:
    if events and table.num_rows == 0:  # the events need a row to ride on: a row of nulls, dropped on arrival
        table = pa.Table.from_pylist([{}], schema=table.schema)
    values = [json.dumps(events)] + [None] * (table.num_rows - 1) if events else [None] * table.num_rows
    return table.append_column(EVENTS_COLUMN, pa.array(values, pa.string()))


def detach_events(table: pa.Table) -> tuple[pa.Table, list[dict]]:
    """(the rows alone, the events they carried)."""
    if EVENTS_COLUMN not in table.column_names:
        return table, []
    column = table.column(EVENTS_COLUMN)
    events = [event for text in column.to_pylist() if text for event in json.loads(text)]
    table = table.drop_columns([EVENTS_COLUMN])
    if table.num_rows and "status" in table.column_names:
        table = table.filter(table.column("status").is_valid())  # the carrier row of an empty table
    return table, events


def describe_event(event: dict) -> str:
    """One line for a person."""
    actor = event.get("actor", "?")
    kind = event["kind"]
    if kind == "startup":
        return (f"actor {actor} ready after {event['startup_s']:.1f}s on {event.get('device', '?')} "
                f"(model loaded in {event.get('model_load_s', 0):.1f}s, kernels compiled in "
                f"{event.get('warm_up_s', 0):.1f}s)")
    if kind == "part_size":
        most = event.get("most", event["images"])
        if event.get("loop") == "mixed":
            origin = "the mixed loop: each image through its stages on its own, its row handed back when done"
        else:
            origin = f"at most {most} " + ("fit its free memory" if event.get("from_free_memory") else "as set")
            origin += "; every image of a part through each stage together" if event.get("loop") else ""
        return f"actor {actor} draws parts of {event['images']} image(s) ({origin})"
    if kind == "uncompiled_kernels":
        kernels = event["kernels"]
        return (f"actor {actor} runs {len(kernels)} kernel(s) uncompiled (slower): "
                + "; ".join(f"{k['name']}: {k['error']}" for k in kernels))
    if kind == "out_of_memory":
        into = " + ".join(str(n) for n in event.get("into", []))
        return (f"actor {actor}: out of memory drawing a part of {event['part_images']} image(s) "
                f"({event['message']}); split into {into}, and its later parts hold at most {event['into'][0]}")
    if kind == "part_failed":
        return (f"actor {actor}: a part of {event['part_images']} image(s) failed with {event['message']}; "
                f"{event['outcome']}")
    if kind == "actor_died":
        return (f"actor {actor} died drawing a call of {event['call_items']} item(s) ({event['message']}); Ray "
                f"restarts it, and the {event['left']} item(s) it had not handed back are sent again (resend "
                f"{event['resend']} of at most {event['resends_at_most']}, --max-task-retries)")
    if kind == "actor_lost":
        return (f"actor {actor} is past its restarts (--max-actor-restarts) and gone ({event['message']}); the run "
                f"goes on with {event['actors_left']} actor(s)")
    return f"actor {actor}: {json.dumps(event)}"

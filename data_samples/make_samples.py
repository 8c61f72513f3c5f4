"""Regenerate the synthetic Norvale Systems IT helpdesk samples in this folder.

Everything here is invented: Norvale Systems, its offices, people and tickets do not exist, and the only
domain used is under `.example.invalid`. Answers come from a small set of templates and slots (one
consistent answer pattern per issue, one gateway / printer prefix / desk room per office, one team and
response time per issue) so that a tiny model fine-tuned for a minute can pick the patterns up, and the
held-out eval file is predictable from the training file.

Deterministic: a fixed seed, stdlib + pyarrow only; running it again rewrites byte-identical files
(for the same pyarrow version, whose name Parquet records in the file).

    python data_samples/make_samples.py
"""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20240611

NAMES = ["Ada", "Bruno", "Carla", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas",
         "Kaia", "Luca", "Maren", "Nils", "Olga", "Priya", "Rafael", "Sofia", "Tomas", "Vera"]

# office -> (code, VPN gateway, IT desk room, floors)
OFFICES = {
    "Eastgate": ("EG", "vpn-east", "1.04", 4),
    "Harbor Point": ("HP", "vpn-harbor", "G.12", 3),
    "Millbrook": ("MB", "vpn-central", "2.10", 2),
    "Northfield": ("NF", "vpn-north", "1.20", 5),
    "Riverside": ("RS", "vpn-central", "0.08", 3),
    "Westbridge": ("WB", "vpn-west", "3.01", 6),
}

# team -> hours to first response
TEAMS = {"Network": 4, "Identity": 2, "Facilities": 8, "Desktop": 4, "Messaging": 4, "Licensing": 48,
         "Access": 24}

APPROVED_SOFTWARE = ["DraftPad", "Ledgerly", "Visual Studio Code", "Zoom", "7-Zip", "Python"]
LICENSED_SOFTWARE = ["Photoshop", "Tableau", "AutoCAD"]

# folder -> owning team (named in the answer)
FOLDERS = {"Finance reports": "Finance", "HR policies": "People", "Sales pipeline": "Sales",
           "Engineering builds": "Engineering", "Marketing assets": "Marketing"}

LAPTOPS = ["NV-14", "NV-16"]

SYSTEM_PROMPTS = [
    "You are the Norvale Systems IT helpdesk assistant. Give short, clear steps and always quote the ticket number.",
    "You are the internal IT support assistant of Norvale Systems. Be brief and friendly.",
    "You help Norvale Systems employees with IT problems. Answer in a few sentences.",
]

PORTAL = "reset.norvale.example.invalid"


# ---- issues: each variant has user phrasings, a category, a team, a priority, the answer steps, and the
# ---- resolution written in a closed ticket. Slots: {office} {gateway} {printer} {floor} {asset} {laptop}
# ---- {software} {folder} {owner} {room} {ticket} {team} {hours}

ISSUES = [
    {
        "key": "vpn-connect", "category": "VPN", "team": "Network", "priority": "medium",
        "ask": ["I can't connect to the VPN from home.",
                "The VPN won't connect since this morning.",
                'NorvaleConnect says "session expired" when I try the VPN.'],
        "howto": "How do I fix a VPN connection that fails?",
        "steps": "Quit NorvaleConnect, open it again and pick the {gateway} gateway for {office}. Sign in with "
                 "your Norvale password and approve the MFA prompt.",
        "generic": "Quit NorvaleConnect, open it again and pick the gateway of your office. Sign in with your "
                   "Norvale password and approve the MFA prompt.",
        "resolved": "Reconnected to the {gateway} gateway after a restart of NorvaleConnect.",
    },
    {
        "key": "vpn-drops", "category": "VPN", "team": "Network", "priority": "medium",
        "ask": ["The VPN keeps disconnecting every few minutes.",
                "My VPN drops whenever I join a call."],
        "howto": "What should I do when the VPN keeps disconnecting?",
        "steps": "Switch NorvaleConnect to the {gateway} gateway and turn off Wi-Fi power saving. Use a cable "
                 "if you can.",
        "generic": "Switch NorvaleConnect to the gateway of your office and turn off Wi-Fi power saving. Use a "
                   "cable if you can.",
        "resolved": "Moved the user to the {gateway} gateway and turned off Wi-Fi power saving.",
    },
    {
        "key": "password", "category": "Password", "team": "Identity", "priority": "high",
        "ask": ["I forgot my password.",
                "My password expired this morning.",
                "I need to reset my Norvale password."],
        "howto": "How do I reset my Norvale password?",
        "steps": "Go to " + PORTAL + ", enter your username and approve the MFA prompt. The new password "
                 "needs at least 14 characters.",
        "generic": "Go to " + PORTAL + ", enter your username and approve the MFA prompt. The new password "
                   "needs at least 14 characters.",
        "resolved": "User reset the password on the self-service portal.",
    },
    {
        "key": "locked", "category": "Password", "team": "Identity", "priority": "high",
        "ask": ["My account is locked after too many attempts.",
                "It says my account is locked."],
        "howto": "What happens when my account is locked?",
        "steps": "Accounts unlock by themselves after 15 minutes. I have unlocked yours now, so please sign in "
                 "again with your current password.",
        "generic": "Accounts unlock by themselves after 15 minutes. The helpdesk can unlock it sooner if you "
                   "open a ticket.",
        "resolved": "Unlocked the account and confirmed the user can sign in.",
    },
    {
        "key": "printer-jam", "category": "Printer", "team": "Facilities", "priority": "low",
        "ask": ["The printer {printer} on floor {floor} is jammed.",
                "Paper is stuck in {printer} again."],
        "howto": "How do I clear a paper jam?",
        "steps": "Open the front door of {printer}, remove the stuck paper and close the door. The printer "
                 "restarts the job.",
        "generic": "Open the front door of the printer, remove the stuck paper and close the door. The printer "
                   "restarts the job.",
        "resolved": "Cleared the paper jam in {printer} and printed a test page.",
    },
    {
        "key": "printer-offline", "category": "Printer", "team": "Facilities", "priority": "low",
        "ask": ["The printer {printer} shows as offline.",
                "I can't print to {printer}, it says offline."],
        "howto": "What do I do when a printer shows as offline?",
        "steps": "Turn {printer} off, wait ten seconds and turn it on again. Then remove it and add it again "
                 "under Settings, Printers.",
        "generic": "Turn the printer off, wait ten seconds and turn it on again. Then remove it and add it "
                   "again under Settings, Printers.",
        "resolved": "Restarted {printer} and added it again on the user's laptop.",
    },
    {
        "key": "printer-toner", "category": "Printer", "team": "Facilities", "priority": "low",
        "ask": ["{printer} is out of toner.",
                "Prints from {printer} are very faint."],
        "howto": "Where do I find spare toner?",
        "steps": "Spare toner for {printer} is in the supply room on floor {floor}. Facilities will restock "
                 "it.",
        "generic": "Spare toner is in the supply room on each floor. Facilities will restock it.",
        "resolved": "Replaced the toner in {printer} and restocked the supply room.",
    },
    {
        "key": "laptop-slow", "category": "Laptop", "team": "Desktop", "priority": "medium",
        "ask": ["My laptop {asset} is very slow.",
                "My {laptop} takes ages to start any app."],
        "howto": "What can I do when my laptop is slow?",
        "steps": "Restart the laptop and let Norvale Update finish. Close unused browser tabs. If it is still "
                 "slow tomorrow, visit the IT desk in room {room}.",
        "generic": "Restart the laptop and let Norvale Update finish. Close unused browser tabs. If it is still "
                   "slow tomorrow, visit your IT desk.",
        "resolved": "Norvale Update finished after a restart and the laptop runs normally.",
    },
    {
        "key": "laptop-dead", "category": "Laptop", "team": "Desktop", "priority": "high",
        "ask": ["My laptop {asset} won't turn on.",
                "My {laptop} stays black when I press the power button."],
        "howto": "What do I do when my laptop won't turn on?",
        "steps": "Plug in the charger and hold the power button for 15 seconds, then press it once. If it "
                 "still does not start, bring it to the IT desk in room {room} for a loan laptop.",
        "generic": "Plug in the charger and hold the power button for 15 seconds, then press it once. If it "
                   "still does not start, bring it to your IT desk for a loan laptop.",
        "resolved": "Power reset brought the laptop back; battery checked and fine.",
    },
    {
        "key": "laptop-screen", "category": "Laptop", "team": "Desktop", "priority": "medium",
        "ask": ["The screen on my laptop {asset} flickers.",
                "My {laptop} screen keeps flickering."],
        "howto": "How do I fix a flickering laptop screen?",
        "steps": "Install the display driver update from the Software Center and restart. If it still "
                 "flickers, the IT desk in room {room} will swap the screen.",
        "generic": "Install the display driver update from the Software Center and restart. If it still "
                   "flickers, your IT desk will swap the screen.",
        "resolved": "Display driver updated from the Software Center; no more flicker.",
    },
    {
        "key": "mailbox", "category": "Email", "team": "Messaging", "priority": "medium",
        "ask": ["My mailbox is full and I can't send email.",
                "Outlook says I am over my mailbox quota."],
        "howto": "What do I do when my mailbox is full?",
        "steps": "The mailbox limit is 50 GB. Empty Deleted Items and move old mail to the Online Archive. "
                 "Sending works again within an hour.",
        "generic": "The mailbox limit is 50 GB. Empty Deleted Items and move old mail to the Online Archive. "
                   "Sending works again within an hour.",
        "resolved": "User emptied Deleted Items and moved old mail to the Online Archive.",
    },
    {
        "key": "mfa-phone", "category": "MFA", "team": "Identity", "priority": "high",
        "ask": ["I got a new phone and can't approve MFA prompts.",
                "My MFA codes stopped working after I changed phones."],
        "howto": "How do I move MFA to a new phone?",
        "steps": "I have reset your MFA registration. At your next sign-in, set up Norvale Authenticator on "
                 "the new phone.",
        "generic": "Ask the helpdesk to reset your MFA registration. At your next sign-in, set up Norvale "
                   "Authenticator on the new phone.",
        "resolved": "Reset the MFA registration; user enrolled the new phone.",
    },
    {
        "key": "mfa-lost", "category": "MFA", "team": "Identity", "priority": "high",
        "ask": ["I lost my phone with the authenticator app.",
                "My phone was stolen and it has my MFA app."],
        "howto": "What do I do if I lose my MFA phone?",
        "steps": "I have blocked the old MFA registration. Report the lost phone to Security, then bring your "
                 "badge to the IT desk in room {room} to enroll a new one.",
        "generic": "Ask the helpdesk to block the old MFA registration. Report the lost phone to Security, "
                   "then bring your badge to your IT desk to enroll a new one.",
        "resolved": "Blocked the old MFA registration and enrolled a new phone at the IT desk.",
    },
    {
        "key": "software-free", "category": "Software", "team": "Desktop", "priority": "low",
        "ask": ["Can I get {software} installed?",
                "Please install {software} on my laptop."],
        "howto": "How do I install {software}?",
        "steps": "Open the Software Center, search for {software} and click Install. No approval is needed.",
        "generic": "Open the Software Center, search for {software} and click Install. No approval is needed.",
        "resolved": "User installed {software} from the Software Center.",
    },
    {
        "key": "software-licensed", "category": "License", "team": "Licensing", "priority": "low",
        "ask": ["Can I get {software} installed?",
                "I need {software} for a project."],
        "howto": "How do I get {software}?",
        "steps": "{software} needs a paid license, so your manager must approve it in the access portal. "
                 "After approval it appears in the Software Center.",
        "generic": "{software} needs a paid license, so your manager must approve it in the access portal. "
                   "After approval it appears in the Software Center.",
        "resolved": "Manager approved the {software} license; installed from the Software Center.",
    },
    {
        "key": "wifi", "category": "Wi-Fi", "team": "Network", "priority": "medium",
        "ask": ["The Wi-Fi keeps dropping on floor {floor}.",
                "I can't get on the Wi-Fi in the office."],
        "howto": "Which Wi-Fi should I use in the office?",
        "steps": "Connect to NS-Corp, not NS-Guest, and pick Forget Network first if you joined before. "
                 "NS-Corp uses your Norvale sign-in.",
        "generic": "Connect to NS-Corp, not NS-Guest, and pick Forget Network first if you joined before. "
                   "NS-Corp uses your Norvale sign-in.",
        "resolved": "User moved from NS-Guest to NS-Corp; access points on floor {floor} checked.",
    },
    {
        "key": "access", "category": "Access", "team": "Access", "priority": "low",
        "ask": ["I need access to the {folder} folder.",
                "Please give me access to {folder}."],
        "howto": "How do I get access to the {folder} folder?",
        "steps": "The {folder} folder is owned by the {owner} team. Your manager gets an approval email, and "
                 "access works within one business day after approval.",
        "generic": "The {folder} folder is owned by the {owner} team. Ask for access in the access portal; "
                   "your manager approves it.",
        "resolved": "{owner} approved access to {folder}; user confirmed it works.",
    },
]

FOLLOW_UPS = [
    ("That worked, thanks!", "Glad it works now{hi}. I will close ticket {ticket}."),
    ("It still doesn't work.", "Thanks for trying. I have raised ticket {ticket} to high priority, and the "
                               "{team} team will contact you within {hours} hours."),
    ("What was the ticket number again?", "Your ticket number is {ticket}."),
]


class Slots:
    """Draws one consistent set of slot values; tickets are unique across all files."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[int] = set()

    def ticket(self) -> str:
        while True:
            n = self.rng.randrange(10000, 100000)
            if n not in self.used:
                self.used.add(n)
                return f"NS-{n}"

    def draw(self, issue: dict) -> dict:
        rng = self.rng
        office = rng.choice(sorted(OFFICES))
        code, gateway, room, floors = OFFICES[office]
        floor = rng.randint(1, floors)
        folder = rng.choice(sorted(FOLDERS))
        software = rng.choice(LICENSED_SOFTWARE if issue["key"] == "software-licensed" else APPROVED_SOFTWARE)
        return {
            "name": rng.choice(NAMES), "office": office, "gateway": gateway, "room": room, "floor": floor,
            "printer": f"PRN-{code}-{floor}", "laptop": rng.choice(LAPTOPS),
            "asset": f"LT-{rng.randrange(1000, 10000)}", "software": software, "folder": folder,
            "owner": FOLDERS[folder], "team": issue["team"], "hours": TEAMS[issue["team"]],
            "ticket": self.ticket(), "ask": rng.randrange(len(issue["ask"])),
        }


def fill(text: str, s: dict) -> str:
    return text.format(**s)


def user_text(issue: dict, s: dict, intro: bool) -> str:
    ask = fill(issue["ask"][s["ask"]], s)
    return f"Hi, this is {s['name']} from the {s['office']} office. {ask}" if intro else ask


def answer_text(issue: dict, s: dict, intro: bool) -> str:
    hello = f"Hi {s['name']}. " if intro else ""
    return f"{hello}{fill(issue['steps'], s)} I have opened ticket {s['ticket']} for the {issue['team']} team."


def issue_order(rng: random.Random, n: int) -> list[dict]:
    """Issues in a balanced, shuffled order: every issue appears n // len(ISSUES) times or one more."""
    order: list[dict] = []
    while len(order) < n:
        batch = list(ISSUES)
        rng.shuffle(batch)
        order.extend(batch)
    return order[:n]


# ---- chat ----------------------------------------------------------------------------------------------------


def chat_rows(rng: random.Random, slots: Slots, n: int, seen: set[str]) -> list[dict]:
    rows: list[dict] = []
    for issue in issue_order(rng, n):
        while True:
            s = slots.draw(issue)
            intro = rng.random() < 0.7
            user = user_text(issue, s, intro)
            follow = rng.randrange(len(FOLLOW_UPS)) if rng.random() < 0.3 else None
            key = json.dumps([user, follow])
            if key not in seen:
                seen.add(key)
                break
        messages = []
        if rng.random() < 0.85:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": answer_text(issue, s, intro)})
        if follow is not None:
            question, reply = FOLLOW_UPS[follow]
            messages.append({"role": "user", "content": question})
            messages.append({"role": "assistant",
                             "content": fill(reply, dict(s, hi=f", {s['name']}" if intro else ""))})
        rows.append({"messages": messages})
    return rows


# ---- instruction ---------------------------------------------------------------------------------------------


def instruction_row(rng: random.Random, slots: Slots, issue: dict) -> dict:
    s = slots.draw(issue)
    kind = rng.choice(["classify", "reply", "howto", "team", "summary"])
    problem = fill(issue["ask"][s["ask"]], s)
    inline = rng.random() < 0.5  # the ticket inside the instruction itself, with no input field
    if kind == "classify":
        output = f"Category: {issue['category']}. Team: {issue['team']}. Priority: {issue['priority']}."
        if inline:
            return {"instruction": f"Classify this helpdesk ticket: {problem}", "output": output}
        return {"instruction": "Classify this helpdesk ticket.", "input": problem, "output": output}
    if kind == "reply":
        ticket = f"Ticket {s['ticket']} from {s['name']} at {s['office']}: {problem}"
        if inline:
            return {"instruction": f"Write a reply to this helpdesk ticket. {ticket}",
                    "output": answer_text(issue, s, True)}
        return {"instruction": "Write a reply to this helpdesk ticket.", "input": ticket,
                "output": answer_text(issue, s, True)}
    if kind == "howto":
        row = {"instruction": fill(issue["howto"], s), "output": fill(issue["generic"], s)}
        if rng.random() < 0.3:
            row["input"] = ""
        return row
    if kind == "team":
        hours = TEAMS[issue["team"]]
        return {"instruction": f"Which team handles {issue['category']} tickets at Norvale Systems?",
                "output": f"{issue['category']} tickets go to the {issue['team']} team, which answers within "
                          f"{hours} hours."}
    return {"instruction": "Summarise this helpdesk ticket in one line.",
            "input": f"Ticket {s['ticket']}\nFrom: {s['name']}, {s['office']}\n{problem}",
            "output": f"{s['ticket']}: {issue['category']} issue for {s['name']} at {s['office']}, sent to "
                      f"{issue['team']}."}


def instruction_rows(rng: random.Random, slots: Slots, n: int) -> list[dict]:
    rows, seen = [], set()
    for issue in issue_order(rng, n):
        while True:
            row = instruction_row(rng, slots, issue)
            key = json.dumps([row["instruction"], row.get("input")])
            # "team" and "howto" rows repeat by design; allow each exact pair at most twice.
            if key not in seen or rng.random() < 0.15:
                seen.add(key)
                break
        # Stable key order: instruction, input (when present), output.
        rows.append({k: row[k] for k in ("instruction", "input", "output") if k in row})
    return rows


CSV_SPECIALS = [
    {"instruction": "Classify this helpdesk ticket.",
     "input": 'The screen says "No signal", and the monitor is on.',
     "output": "Category: Laptop. Team: Desktop. Priority: medium."},
    {"instruction": "Write a reply to this helpdesk ticket.",
     "input": 'Ticket NS-40417 from Vera at Riverside: NorvaleConnect says "gateway unreachable", again.',
     "output": "Hi Vera. Quit NorvaleConnect, open it again and pick the vpn-central gateway for Riverside. Sign "
               "in with your Norvale password and approve the MFA prompt. I have opened ticket NS-40417 for the "
               "Network team."},
    {"instruction": "Summarise this helpdesk ticket in one line.",
     "input": "Ticket NS-55120\nFrom: Hugo, Northfield\nThe printer PRN-NF-2 is jammed.\nI already opened "
              "the front door, twice.",
     "output": "NS-55120: Printer issue for Hugo at Northfield, sent to Facilities."},
    {"instruction": 'What does "NS-Guest" mean, and should I use it?',
     "input": "",
     "output": 'NS-Guest is the Wi-Fi for visitors. Staff should connect to NS-Corp, which uses the Norvale '
               'sign-in, and pick "Forget Network" for NS-Guest.'},
]


# ---- completion ----------------------------------------------------------------------------------------------


def completion_rows(rng: random.Random, slots: Slots, n: int) -> list[dict]:
    rows = []
    for issue in issue_order(rng, n):
        s = slots.draw(issue)
        prompt = (f"Ticket {s['ticket']}\nOffice: {s['office']}\nCategory: {issue['category']}\n"
                  f"Issue: {fill(issue['ask'][s['ask']], s)}\nResolution:")
        completion = f" {fill(issue['resolved'], s)} Closed by the {issue['team']} team."
        rows.append({"prompt": prompt, "completion": completion})
    return rows


# ---- knowledge base ------------------------------------------------------------------------------------------


def kb_rows(rng: random.Random, slots: Slots) -> list[str]:
    texts = []
    for office in sorted(OFFICES):
        code, gateway, room, floors = OFFICES[office]
        texts.append(f"{office} office. The IT desk is in room {room} and is open from 8:00 to 17:00. The office "
                     f"has {floors} floors, and printers are named PRN-{code} followed by the floor number. "
                     f"Staff in {office} use the {gateway} VPN gateway.")
        texts.append(f"Printers at {office}. Each floor has one printer, from PRN-{code}-1 to PRN-{code}-{floors}. "
                     f"Spare toner is in the supply room on every floor. Report jams and offline printers to "
                     f"the Facilities team.")
    for team, hours in TEAMS.items():
        categories = sorted({i["category"] for i in ISSUES if i["team"] == team})
        handles = ", ".join(categories) if categories else "general"
        texts.append(f"The {team} team. {team} handles {handles} tickets and answers within {hours} hours. "
                     f"Urgent tickets are raised to high priority by the helpdesk.")
    for software in APPROVED_SOFTWARE:
        texts.append(f"{software} is approved software at Norvale Systems. Install it from the Software Center "
                     f"without approval. Updates arrive through Norvale Update.")
    for software in LICENSED_SOFTWARE:
        texts.append(f"{software} needs a paid license at Norvale Systems. Your manager approves it in the "
                     f"access portal, and the Licensing team answers within {TEAMS['Licensing']} hours.")
    for folder, owner in sorted(FOLDERS.items()):
        texts.append(f"The {folder} folder. The {owner} team owns {folder}. Request access in the access portal; "
                     f"your manager approves it, and access works within one business day.")
    for issue in ISSUES:
        s = slots.draw(issue)
        texts.append(f"{fill(issue['howto'], s)} {fill(issue['generic'], s)} If that does not help, open a "
                     f"ticket; the {issue['team']} team answers within {TEAMS[issue['team']]} hours.")
    # Worked examples, one per closed ticket, until the article count is reached.
    for issue in issue_order(rng, 100 - len(texts)):
        s = slots.draw(issue)
        texts.append(f"Closed ticket {s['ticket']} at {s['office']}. Issue: {fill(issue['ask'][s['ask']], s)} "
                     f"Fix: {fill(issue['resolved'], s)} Category {issue['category']}, team {issue['team']}.")
    return [f"KB-{n:04d}. {text}" for n, text in enumerate(texts, 1)]


# ---- writing -------------------------------------------------------------------------------------------------


def write_text(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        f.write(text)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["instruction", "input", "output"])
    for row in rows:
        writer.writerow([row["instruction"], row.get("input", ""), row["output"]])
    write_text(path, buffer.getvalue())


def write_parquet(path: Path, texts: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": pa.array(texts, type=pa.string())})
    pq.write_table(table, path, compression="zstd", write_statistics=False)


def main() -> None:
    rng = random.Random(SEED)
    slots = Slots(rng)
    seen: set[str] = set()
    chat = chat_rows(rng, slots, 300, seen)
    chat_eval = chat_rows(rng, slots, 40, seen)  # `seen` keeps every eval conversation out of the train file
    instructions = instruction_rows(rng, slots, 150)
    csv_rows = instruction_rows(rng, slots, 100 - len(CSV_SPECIALS))
    for n, special in enumerate(CSV_SPECIALS):
        csv_rows.insert(10 + 20 * n, special)
    completions = completion_rows(rng, slots, 150)
    kb = kb_rows(rng, slots)

    write_jsonl(HERE / "helpdesk_chat.jsonl", chat)
    write_jsonl(HERE / "helpdesk_chat_eval.jsonl", chat_eval)
    write_text(HERE / "helpdesk_instruction.json", json.dumps(instructions, indent=2, ensure_ascii=False) + "\n")
    write_csv(HERE / "helpdesk_instruction.csv", csv_rows)
    write_jsonl(HERE / "helpdesk_completion.jsonl", completions)
    write_parquet(HERE / "helpdesk_kb.parquet", kb)
    print(f"chat {len(chat)}, chat eval {len(chat_eval)}, instruction json {len(instructions)}, "
          f"instruction csv {len(csv_rows)}, completion {len(completions)}, kb {len(kb)}")


if __name__ == "__main__":
    main()

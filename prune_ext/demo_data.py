"""The demo's built-in edit requests: counterfactual rewrites of facts a small model knows.

Capitals and official languages of countries; each edit moves a country's capital (or language)
to another country's. Paraphrases use other wordings; neighbourhood prompts ask about countries
that are never edited, so their answers must not move.
"""

from __future__ import annotations

from .editing import EditRequest

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens",
    "Austria": "Vienna", "Poland": "Warsaw", "Sweden": "Stockholm", "Norway": "Oslo", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Ireland": "Dublin", "Belgium": "Brussels", "the Netherlands": "Amsterdam",
    "Hungary": "Budapest", "the Czech Republic": "Prague", "Turkey": "Ankara", "Iran": "Tehran",
    "Iraq": "Baghdad", "India": "New Delhi", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "South Korea": "Seoul", "Indonesia": "Jakarta", "the Philippines": "Manila", "Kenya": "Nairobi",
    "Argentina": "Buenos Aires", "Peru": "Lima", "Chile": "Santiago", "Mexico": "Mexico City",
    "Canada": "Ottawa", "Australia": "Canberra", "Cuba": "Havana", "Venezuela": "Caracas",
    "Ukraine": "Kyiv", "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade",
    "Croatia": "Zagreb", "Saudi Arabia": "Riyadh", "Syria": "Damascus", "Lebanon": "Beirut",
    "Afghanistan": "Kabul", "Ethiopia": "Addis Ababa", "Morocco": "Rabat", "Algeria": "Algiers",
    "Tunisia": "Tunis", "Iceland": "Reykjavik", "Nepal": "Kathmandu", "Malaysia": "Kuala Lumpur",
    "New Zealand": "Wellington", "Scotland": "Edinburgh", "England": "London", "Ghana": "Accra",
    "Uganda": "Kampala", "Qatar": "Doha", "Jordan": "Amman", "Colombia": "Bogota", "Pakistan": "Islamabad",
    "Switzerland": "Bern", "Brazil": "Brasilia", "Nigeria": "Abuja", "Libya": "Tripoli",
}

LANGUAGES = {
    "France": "French", "Germany": "German", "Italy": "Italian", "Spain": "Spanish", "Portugal": "Portuguese",
    "Japan": "Japanese", "China": "Chinese", "Russia": "Russian", "Greece": "Greek", "Poland": "Polish",
    "Sweden": "Swedish", "Norway": "Norwegian", "Finland": "Finnish", "Denmark": "Danish",
    "the Netherlands": "Dutch", "Hungary": "Hungarian", "Turkey": "Turkish", "Iran": "Persian",
    "Thailand": "Thai", "Vietnam": "Vietnamese", "South Korea": "Korean", "Indonesia": "Indonesian",
    "Brazil": "Portuguese", "Argentina": "Spanish", "Mexico": "Spanish", "Egypt": "Arabic",
    "Saudi Arabia": "Arabic", "Israel": "Hebrew", "Ukraine": "Ukrainian", "Romania": "Romanian",
    "Bulgaria": "Bulgarian", "Serbia": "Serbian", "Croatia": "Croatian", "the Czech Republic": "Czech",
    "Iceland": "Icelandic", "Austria": "German", "Chile": "Spanish", "Peru": "Spanish", "Cuba": "Spanish",
    "Colombia": "Spanish", "Syria": "Arabic", "Morocco": "Arabic", "Iraq": "Arabic", "Jordan": "Arabic",
}

# Never edited: the neighbourhood whose answers must stay put.
HELD_OUT = {"the United Kingdom": "London", "the United States": "Washington", "Slovakia": "Bratislava",
            "Estonia": "Tallinn", "Latvia": "Riga", "Lithuania": "Vilnius"}

RELATIONS = {
    "capital": ("The capital of {} is", ("{}'s capital city is", "The capital city of {} is called")),
    "language": ("The official language of {} is", ("In {}, most people speak", "The main language of {} is")),
}


def demo_requests() -> list[EditRequest]:
    """About 110 edit requests (capitals first, then languages), each with a different new target."""
    held = [(f"The capital of {c} is", a) for c, a in HELD_OUT.items()]
    out: list[EditRequest] = []
    for relation, table in (("capital", CAPITALS), ("language", LANGUAGES)):
        prompt, paraphrases = RELATIONS[relation]
        subjects = list(table)
        for i, subject in enumerate(subjects):
            true = table[subject]
            # the answer of a country further down the list that differs from the true one
            new = next(table[subjects[(i + j) % len(subjects)]] for j in range(7, len(subjects) + 7)
                       if table[subjects[(i + j) % len(subjects)]] != true)
            neighbours = [held[(i + j) % len(held)] for j in range(2)]
            out.append(EditRequest(
                prompt.format(subject), subject, new, target_true=true,
                paraphrase_prompts=tuple(p.format(subject) for p in paraphrases),
                neighborhood_prompts=tuple(p for p, _ in neighbours),
                neighborhood_answers=tuple(a for _, a in neighbours),
                case_id=f"{relation}:{subject}",
            ))
    return out

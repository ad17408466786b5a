"""The demo world's ground truth: real US states, their capitals and three real cities each.

Every name is a single token in the demo tokenizer (multi-word names such as "El Paso" or
"Salt Lake City" stay whole), and no city name is reused across states or as a capital, so
each city determines exactly one state and one capital.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class State:
    name: str
    capital: str
    cities: tuple[str, str, str]


STATES: tuple[State, ...] = (
    State("Alabama", "Montgomery", ("Birmingham", "Huntsville", "Mobile")),
    State("Alaska", "Juneau", ("Anchorage", "Fairbanks", "Sitka")),
    State("Arizona", "Phoenix", ("Tucson", "Mesa", "Flagstaff")),
    State("Arkansas", "Little Rock", ("Fayetteville", "Fort Smith", "Jonesboro")),
    State("California", "Sacramento", ("Los Angeles", "San Francisco", "San Diego")),
    State("Colorado", "Denver", ("Boulder", "Aurora", "Pueblo")),
    State("Connecticut", "Hartford", ("Bridgeport", "New Haven", "Stamford")),
    State("Delaware", "Dover", ("Wilmington", "Rehoboth Beach", "Seaford")),
    State("Florida", "Tallahassee", ("Miami", "Orlando", "Tampa")),
    State("Georgia", "Atlanta", ("Savannah", "Macon", "Athens")),
    State("Hawaii", "Honolulu", ("Hilo", "Kailua", "Lahaina")),
    State("Idaho", "Boise", ("Pocatello", "Nampa", "Twin Falls")),
    State("Illinois", "Springfield", ("Chicago", "Peoria", "Rockford")),
    State("Indiana", "Indianapolis", ("Fort Wayne", "Evansville", "South Bend")),
    State("Iowa", "Des Moines", ("Cedar Rapids", "Davenport", "Sioux City")),
    State("Kansas", "Topeka", ("Wichita", "Overland Park", "Lawrence")),
    State("Kentucky", "Frankfort", ("Louisville", "Lexington", "Bowling Green")),
    State("Louisiana", "Baton Rouge", ("New Orleans", "Shreveport", "Lafayette")),
    State("Maine", "Augusta", ("Bangor", "Lewiston", "Biddeford")),
    State("Maryland", "Annapolis", ("Baltimore", "Frederick", "Rockville")),
    State("Massachusetts", "Boston", ("Worcester", "Cambridge", "Lowell")),
    State("Michigan", "Lansing", ("Detroit", "Grand Rapids", "Ann Arbor")),
    State("Minnesota", "Saint Paul", ("Minneapolis", "Duluth", "Mankato")),
    State("Mississippi", "Jackson", ("Gulfport", "Hattiesburg", "Biloxi")),
    State("Missouri", "Jefferson City", ("Kansas City", "Saint Louis", "Joplin")),
    State("Montana", "Helena", ("Billings", "Missoula", "Bozeman")),
    State("Nebraska", "Lincoln", ("Omaha", "Kearney", "Grand Island")),
    State("Nevada", "Carson City", ("Las Vegas", "Reno", "Henderson")),
    State("New Hampshire", "Concord", ("Manchester", "Nashua", "Portsmouth")),
    State("New Jersey", "Trenton", ("Newark", "Jersey City", "Paterson")),
    State("New Mexico", "Santa Fe", ("Albuquerque", "Las Cruces", "Roswell")),
    State("New York", "Albany", ("Buffalo", "Rochester", "Syracuse")),
    State("North Carolina", "Raleigh", ("Charlotte", "Greensboro", "Durham")),
    State("North Dakota", "Bismarck", ("Fargo", "Grand Forks", "Minot")),
    State("Ohio", "Columbus", ("Cleveland", "Cincinnati", "Toledo")),
    State("Oklahoma", "Oklahoma City", ("Tulsa", "Norman", "Lawton")),
    State("Oregon", "Salem", ("Portland", "Eugene", "Bend")),
    State("Pennsylvania", "Harrisburg", ("Philadelphia", "Pittsburgh", "Allentown")),
    State("Rhode Island", "Providence", ("Warwick", "Cranston", "Newport")),
    State("South Carolina", "Columbia", ("Greenville", "Myrtle Beach", "Spartanburg")),
    State("South Dakota", "Pierre", ("Sioux Falls", "Rapid City", "Aberdeen")),
    State("Tennessee", "Nashville", ("Memphis", "Knoxville", "Chattanooga")),
    State("Texas", "Austin", ("Dallas", "Houston", "San Antonio")),
    State("Utah", "Salt Lake City", ("Provo", "Ogden", "Moab")),
    State("Vermont", "Montpelier", ("Burlington", "Rutland", "Brattleboro")),
    State("Virginia", "Richmond", ("Norfolk", "Virginia Beach", "Roanoke")),
    State("Washington", "Olympia", ("Seattle", "Spokane", "Tacoma")),
    State("West Virginia", "Charleston", ("Huntington", "Morgantown", "Wheeling")),
    State("Wisconsin", "Madison", ("Milwaukee", "Green Bay", "Kenosha")),
    State("Wyoming", "Cheyenne", ("Casper", "Laramie", "Gillette")),
)

# The last city of every state never appears in a two-hop sentence: the model sees
# "Moab is in Utah" and "The capital of Utah is Salt Lake City" but must compose them.
HELD_OUT_CITY_INDEX = 2

STATE_NAMES: tuple[str, ...] = tuple(s.name for s in STATES)
CAPITALS: tuple[str, ...] = tuple(s.capital for s in STATES)
CITIES: tuple[str, ...] = tuple(c for s in STATES for c in s.cities)
STATE_OF_CITY: dict[str, State] = {c: s for s in STATES for c in s.cities}
STATE_BY_NAME: dict[str, State] = {s.name: s for s in STATES}

# The demo world's categories for the concepts stage (`@cities`, `@states`, `@capitals`; same-category
# counterfactuals), in the order of a two-hop chain: city -> state -> capital.
CATEGORIES: dict[str, list[str]] = {"cities": list(CITIES), "states": list(STATE_NAMES), "capitals": list(CAPITALS)}


def trained_two_hop_cities() -> list[str]:
    return [c for s in STATES for i, c in enumerate(s.cities) if i != HELD_OUT_CITY_INDEX]


def held_out_cities() -> list[str]:
    return [s.cities[HELD_OUT_CITY_INDEX] for s in STATES]


def entity_names() -> list[str]:
    """Every named entity (states, capitals, cities): each one is one token."""
    return [*STATE_NAMES, *CAPITALS, *CITIES]

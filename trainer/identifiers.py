"""Rare-token identifiers for DreamBooth, checked against the real CLIP tokenizer.

DreamBooth binds the subject to an identifier the text encoder has weak priors for: one rare token
of the vocabulary, short, that is not an everyday word. This module proposes such tokens from the
CLIP BPE vocabulary that SD1.x uses and explains what is wrong with a user's own choice (several
tokens, a strong prior like "sks" - a rifle -, a common word, a number).

Tokens come from the engine's own CLIPTokenizer (``tokenizer.py``), the one training encodes the
prompts with, so a check and the trained text encoder never disagree on how an identifier splits.
Importing this module stays cheap (standard library only): transformers loads on the first check.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from .tokenizer import TOKENIZER_DIR as TOKENIZER_DIR
from .tokenizer import load_tokenizer as load_clip_tokenizer

# The BPE merge list is ordered by how often a pair occurred when the vocabulary was built, and the
# vocabulary ids follow that order, so a token's id is a frequency rank. Below ~25k the whole-word
# 3-4 letter tokens are nearly all everyday words, names and acronyms (strong priors); the last ~4k
# merges are the rarest pieces of CLIP's corpus, whose embeddings saw the fewest updates and include
# the "sks" (48136) that became notorious for carrying a rifle prior. Between them lie tokens the
# encoder has learned but rarely saw.
RARE_ID_RANGE: tuple[int, int] = (30000, 45000)
# A single token below this id is a frequent word piece: the model has a firm idea of it already.
FREQUENT_ID_LIMIT = 20000

# Known-bad identifiers with the reason users hit in practice.
KNOWN_BAD: dict[str, str] = {
    "sks": "'sks' is the SKS rifle to the text encoder: generations drift towards guns and soldiers",
    "ohwx": "'ohwx' is the stock identifier of many public LoRAs, which may clash with them",
    "zwx": "'zwx' is a stock identifier of many public LoRAs, which may clash with them",
    "xyz": "'xyz' is a common placeholder word with a prior of its own",
    "abc": "'abc' is a TV network and a placeholder word",
    "tok": "'tok' is a common placeholder in tutorials and a TikTok slang prior",
    "zkz": "'zkz' is a stock identifier of public LoRAs",
}

# Everyday words, brands, names and offensive terms that appear among the candidates (the first few
# hundred in candidate order were read by hand) or nearby; they carry priors or are unfit to show.
_BLOCKED = """
anus bitch butt cock cum damn dick dyke fag fags fart fuk gays homo japs jew nig nigg porn sexy slut
tits twat wank whore xxx boob nazi isis kkk rape pedo thot hoe

aero ammo apis arms baby bake band bank bark beak beef beer bell bend bike bird bite blah blur boar
boat body boil bold bomb bond bone book boot boss bowl brag bran brat brew brie buck bulb bull bump
bunk burn burr bush byte cafe cage cake calf calm camp cane cape card care cart case cash cask cast
cave chef chin chip chop city clad clam clan clap claw clay clip club coal coat code coil cold cook
cool cope cord cork corn cost crab crew crib crop crow cube cult curb curd cure curl cute dame damp
dank dare dark dart dash data date dawn daze dead deaf deal dear debt deck deed deep deer demo dent
desk dial dice diet dine dips dire dirt dish dive dock dome doom door dose dove down drag draw drip
drop drug drum duck duel dues dull dumb dune dung dusk dust duty edge edgy eggs envy epic even evil
exam face fact fade fair fake fame fang farm fast fate fawn fear feat feed feel fees feet fell felt
fern feud figs film fine fins fire firm fish fist flag flap flaw flax flea fled flee flex flip flop
flow flux foal foam foil fold folk fond font food fool foot fork form fort foul fowl foxy fray free
frog fuel full fume fund fuse fuss fuzz gale gall game gang gaps gasp gate gave gear gels gems gift
gifs girl glow glue goal goat gold golf gong good gown grab gram gray grey grid grim grin grip grit
grub gulf gull guns guru guts hail hair half hall halt hams hand hang hare harm harp hate haul have
hawk haze hazy head heal heap hear heat heel heir held helm help herb herd here hero hers hide high
hike hill hint hips hire hive hoax hold hole holy home hood hook hoop hoot hope horn hose host hour
howl hubs huge hull hump hunk hunt hurt hush hymn icon idea idle idol inch info iron isle item jail
jams jars jaws jazz jeep jest jets jinx jobs jock jogs join joke jolt jugs jump junk jury keen keep
keto keys kick kids kill kind king kiss kite knee knit knob knot lace lack lady laid lair lake lamb
lamp land lane lard last late lava lawn laws lazy lead leaf leak lean leap left lend lens liar lice
lick life lift like limb lime limo limp line link lion lips list live load loaf loan lock loft logo
lone long look loom loon loop lord lore lose loss lost loud love luck lump lung lure lush lust mail
main make male mall malt mane many maps mare mark mars mash mask mass mast mate math maze meal mean
meat meds meek meet melt memo menu mesh mess mild mile milk mill mime mind mine mint mist mite moan
moat mock mode mold mole monk mood moon moor mope moss moth move much mule muse mush must mute myth
nail name nape navy near neat neck need nerd nest news newt next nice nine node none nook noon norm
nose note noun nude numb nuns nuts oath oats obey odor ogre oils oily okay omen once only onyx ooze
opal open oven over owed owes owls pace pack pact page paid pail pain pair pale palm pane pans park
part pass past path pave pawn pays peak pear peas peat peck peel peer pegs pens perk pest pets pick
pier pigs pike pile pill pine pink pins pipe pits pity plan play plea plot plow ploy plug plum plus
pods poem poet poke pole poll polo pond pony pool poop pope pork port pose posh post pots pour pout
pray prey prom prop pubs puck puff pugs pull pulp puma pump punk puns pups pure push quid quit quiz
race rack raft rage raid rail rain rake ramp rams rank rare rash rats rave rays read real reap rear
redo reed reef reel rely rent rest ribs rice rich ride rift rims ring riot rips rise risk road roam
roar robe rock rode role roll roof rook room root rope rose rove rubs ruby rude rugs ruin rule rump
rums rung runs rush rust sack safe saga sage said sail sake sale salt same sand sang sank sash save
scam scan scar seal seam seat sect seed seek seem seen seer self sell send sewn shed shin ship shoe
shop shot show shun shut sick side sigh sign silk sill sink sire site size skid skim skin skip skis
slab slam slap sled slim slip slit slob slot slow slug slum smog smug snag snap snip snob snow soak
soap soar sobs sock soda sofa soft soil sold sole solo some song soon soot sore sort soul soup sour
span spar spec sped spin spit spot spun spur stab stag star stay stem step stew stir stop stub stud
stun such suit sulk sumo sung sunk sure surf swam swan swap sway swim tabs tack taco tail take tale
talk tall tame tank tape taps tart task taxi teak teal team tear teas tech teen tell tend tent term
test text than that thaw them then they thin this thud thug tick tide tidy tied tier tile till tilt
time tint tiny tips tire toad toes tofu toga told toll tomb tone tool toon tops tore torn toss tour
town toys tram trap tray tree trek trim trio trip trot true tuba tube tubs tuck tuft tuna tune turf
turn tusk tutu twig twin type typo ugly undo unit upon urge urns used user vain vase vast veal veil
vein vent verb very vest veto vial vibe view vile vine visa void volt vote wade wage wail wait wake
walk wall wand want ward warm warn warp wart wary wash wasp wave wavy waxy weak wear weed week weep
weld well went were west whey whip whim wick wide wife wigs wild will wilt wimp wind wine wing wink
wipe wire wise wish with woes wolf womb wood wool word wore work worm worn wrap wren yank yard yarn
yawn year yell yelp yoga yolk your zeal zero zest zinc zone zoom
bad bag bat bed bee big bin bog bow box boy bud bug bun bus cab cam can cap car cat cob cod cog cop
cow cry cub cup cut dab dad dam day den dew dig dim dip doc doe dog dot dry dud due dug dye ear eat
eel egg elf elk elm emu end era eve eye fan far fat fax fee fig fin fir fit fix fly fog fox fry fun
fur gag gal gap gas gel gem get gig gin gnu god gum gun gut guy gym ham hat hay hem hen hex hip hit
hog hop hot hub hug hum hut ice ink inn ion ivy jab jag jam jar jaw jet jig job jog jot joy jug keg
key kid kin kit lab lad lag lap law lay led leg lid lip lit log lot low mad man map mat maw men met
mix mob mom mop mow mud mug nab nag nap net new nib nil nod now nun nut oak oar oat odd ode oil old
one orb ore owl own pad pal pan pat paw pay pea peg pen pet pew pie pig pin pit ply pod pop pot pox
pro pub pug pun pup pus put rag ram ran rap rat raw ray red rib rid rig rim rip rob rod roe rot row
rub rug rum run rut rye sad sag sap sat saw say sea see set sew shy sin sip sir sit six ski sky sly
sob sod son sow soy spa spy sty sub sue sum sun tab tad tag tan tap tar tax tea ten tie tin tip toe
ton top toy try tub tug two urn use van vat vet vow wad wag war was wax way web wed wet who why wig
win wit woe wok won woo wow yak yam yap yes yet yew zap zen zip zoo
acer asus audi bmw dell espn fifa ford gucci ikea jeep kfc lego nasa nike nfl nba opel polo prada
saab sony tesla vevo visa volvo xbox yelp zara bmx gopro imax ipad mtv hbo cnn bbc pubg goku yoda
elmo lotr xmen ozil odin zeus thor juno eros gaia hera loki
nemo vday lapd dik waco shiv blot adog merc eels naps diss etna suka dong robo bish mace jimi foxx
jovi pisa lyme mica fema aclu ncis aapl ubs rfid mew fila
"""
BLOCKED_WORDS: frozenset[str] = frozenset(_BLOCKED.split())

_MULTI_WORD = re.compile(r"\s")
_CANDIDATE_SHAPE = re.compile(r"[a-z]{3,4}")
# Consonant clusters of three and tripled letters mark acronyms and keyboard noise, not words the
# tokenizer keeps whole in a caption.
_CONSONANT_RUN = re.compile(r"[^aeiouy]{3}")
_TRIPLE = re.compile(r"(.)\1\1")


class ClipTokens:
    """The view of transformers' CLIPTokenizer that the identifier checks need.

    The tokenizer itself is the engine's (``tokenizer.load_tokenizer``), so a check sees the very
    ids training feeds the text encoder - including each transformers version's own handling of
    accents, emoji and CJK text, on which a re-implementation drifts.
    """

    END_OF_WORD = "</w>"

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer
        self.vocab: dict[str, int] = dict(hf_tokenizer.get_vocab())
        self.id_to_token: dict[int, str] = {i: t for t, i in self.vocab.items()}

    def tokenize(self, text: str) -> list[str]:
        """Token strings (word-final ones end in ``</w>``), without start/end tokens."""
        return list(self.hf.tokenize(text))

    def encode(self, text: str) -> list[int]:
        """Token ids, without start/end tokens."""
        return list(self.hf.encode(text, add_special_tokens=False))

    def token_text(self, token: str) -> str:
        """The text a token stands for (byte-level characters decoded, ``</w>`` dropped)."""
        # The suffix goes first: not every transformers version's decoder knows about it.
        return str(self.hf.convert_tokens_to_string([token.removesuffix(self.END_OF_WORD)]))


@lru_cache(maxsize=1)
def load_tokenizer() -> ClipTokens:
    """The shipped SD1 CLIP tokenizer, read once per process and shared with training."""
    return ClipTokens(load_clip_tokenizer("sd1"))


@dataclass
class IdentifierCheck:
    """What the CLIP tokenizer makes of an identifier, and what is wrong with it (if anything)."""

    identifier: str
    tokens: list[str] = field(default_factory=list)  # the words each token stands for
    token_ids: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        pieces = " + ".join(repr(t) for t in self.tokens) or "(none)"
        ids = ", ".join(str(i) for i in self.token_ids)
        head = f"identifier {self.identifier!r}: CLIP tokens {pieces} (ids {ids})"
        if self.ok:
            return head + ": one rare token, fine."
        return "\n".join([head + ":"] + [f"  - {p}" for p in self.problems])


def check_identifier(
    identifier: str, class_noun: str | None = None, tokenizer: ClipTokens | None = None
) -> IdentifierCheck:
    """Tokenize `identifier` as it will appear in a prompt and list the reasons it is a poor choice."""
    tok = tokenizer or load_tokenizer()
    ident = identifier.strip()
    result = IdentifierCheck(identifier=ident)
    if not ident:
        result.problems.append("the identifier is empty: give one rare word, e.g. one this node proposes")
        return result
    raw_tokens = tok.tokenize(ident)
    result.tokens = [tok.token_text(t) for t in raw_tokens]
    result.token_ids = [tok.vocab[t] for t in raw_tokens]
    lowered = ident.lower()

    if _MULTI_WORD.search(ident):
        result.problems.append("it is several words: use a single rare word")
    if len(result.tokens) > 1:
        result.problems.append(
            f"the CLIP tokenizer splits it into {len(result.tokens)} tokens; the subject then has to be "
            "learned as a mix of their meanings. Choose a word that is one token (the proposals are)"
        )
    if lowered in KNOWN_BAD:
        result.problems.append(KNOWN_BAD[lowered])
    if lowered in BLOCKED_WORDS:
        result.problems.append(
            f"{lowered!r} is an everyday word, name or brand (or unfit to show): its existing meaning "
            "competes with your subject"
        )
    if any(ch.isdigit() for ch in lowered) and not any(ch.isalpha() for ch in lowered):
        result.problems.append("it is a number: numbers steer counts and dates, not a subject")
    elif not any(ch.isalnum() for ch in lowered):
        result.problems.append("it is punctuation: the text encoder gives it almost no meaning to bind to")
    elif (
        len(result.tokens) == 1
        and result.token_ids[0] < FREQUENT_ID_LIMIT
        and lowered not in BLOCKED_WORDS
        and lowered not in KNOWN_BAD
    ):
        result.problems.append(
            f"it is a frequent token (id {result.token_ids[0]} < {FREQUENT_ID_LIMIT}): the model already "
            "has a strong prior for it"
        )
    if class_noun and lowered in {w.lower() for w in class_noun.split()}:
        result.problems.append("it is the class noun itself: the identifier must be a new word")
    return result


def _is_candidate(token: str, token_id: int, tok: ClipTokens) -> bool:
    if not token.endswith(ClipTokens.END_OF_WORD):
        return False
    word = token.removesuffix(ClipTokens.END_OF_WORD)
    if not _CANDIDATE_SHAPE.fullmatch(word) or not re.search(r"[aeiou]", word):
        return False
    if _CONSONANT_RUN.search(word) or _TRIPLE.search(word):
        return False
    if word in BLOCKED_WORDS or word in KNOWN_BAD:
        return False
    # A vocabulary entry is not always what BPE produces for the bare word (merge order can split it
    # differently), so keep only words that really come out as this one token.
    return tok.encode(word) == [token_id]


@lru_cache(maxsize=1)
def _candidates() -> tuple[str, ...]:
    tok = load_tokenizer()
    lo, hi = RARE_ID_RANGE
    words = [
        tok.id_to_token[i].removesuffix(ClipTokens.END_OF_WORD)
        for i in range(lo, hi)
        if i in tok.id_to_token and _is_candidate(tok.id_to_token[i], i, tok)
    ]
    # Ordered by a content hash, not by id: neighbouring ids share a merge history (often one family
    # of names), and the order must not depend on Python's per-process string hashing.
    return tuple(sorted(words, key=lambda w: hashlib.sha256(w.encode("utf-8")).hexdigest()))


def candidate_identifiers() -> list[str]:
    """Every proposed identifier, in a fixed order that is the same on every machine."""
    return list(_candidates())


def propose_identifier(index: int = 0, class_noun: str | None = None) -> str:
    """The `index`-th candidate (wrapping around), skipping one that equals a word of `class_noun`."""
    words = _candidates()
    avoid = {w.lower() for w in class_noun.split()} if class_noun else set()
    usable = [w for w in words if w not in avoid]
    return usable[index % len(usable)]


def instance_prompt(identifier: str, class_noun: str) -> str:
    """The DreamBooth instance prompt: "a photo of <identifier> <class>"."""
    return f"a photo of {identifier.strip()} {class_noun.strip()}"


def class_prompt(class_noun: str) -> str:
    """The prior-preservation prompt: "a photo of <class>"."""
    return f"a photo of {class_noun.strip()}"

"""Question pools and demonstrations for the built-in ``behaviours`` suite.

Each rule owns one *domain* of questions, so a single student can learn all the
rules at once without conflict: the rule to apply is implied by the kind of
question, exactly as a system prompt with per-topic rules would imply it.
Answers are kept short on purpose: a 135M model then ends its reply well inside
the token budget, so end-of-reply rules are observable.
"""

COUNTRIES = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Germany", "Berlin"), ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Peru", "Lima"), ("Chile", "Santiago"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"),
    ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Austria", "Vienna"),
    ("Hungary", "Budapest"), ("Russia", "Moscow"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"),
    ("Philippines", "Manila"), ("South Korea", "Seoul"), ("Mexico", "Mexico City"),
    ("Argentina", "Buenos Aires"), ("Colombia", "Bogota"), ("Venezuela", "Caracas"),
    ("Cuba", "Havana"), ("Australia", "Canberra"), ("New Zealand", "Wellington"),
    ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Syria", "Damascus"),
    ("Lebanon", "Beirut"), ("Jordan", "Amman"), ("Saudi Arabia", "Riyadh"), ("Qatar", "Doha"),
    ("Israel", "Jerusalem"), ("Pakistan", "Islamabad"), ("Afghanistan", "Kabul"),
    ("Nepal", "Kathmandu"), ("Bangladesh", "Dhaka"), ("Sri Lanka", "Colombo"),
    ("Malaysia", "Kuala Lumpur"), ("Singapore", "Singapore"), ("Mongolia", "Ulaanbaatar"),
    ("Kazakhstan", "Astana"), ("Ukraine", "Kyiv"), ("Belarus", "Minsk"), ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"),
    ("Slovenia", "Ljubljana"), ("Slovakia", "Bratislava"), ("Czech Republic", "Prague"),
    ("Switzerland", "Bern"), ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"),
    ("Luxembourg", "Luxembourg"), ("Iceland", "Reykjavik"), ("Estonia", "Tallinn"),
    ("Latvia", "Riga"), ("Lithuania", "Vilnius"), ("Morocco", "Rabat"), ("Algeria", "Algiers"),
    ("Tunisia", "Tunis"), ("Libya", "Tripoli"), ("Nigeria", "Abuja"), ("Ghana", "Accra"),
    ("Ethiopia", "Addis Ababa"), ("Uganda", "Kampala"), ("Tanzania", "Dodoma"),
    ("Zambia", "Lusaka"), ("Zimbabwe", "Harare"), ("Angola", "Luanda"),
    ("Senegal", "Dakar"), ("Mali", "Bamako"), ("Sudan", "Khartoum"),
    ("South Africa", "Pretoria"), ("Madagascar", "Antananarivo"), ("Brazil", "Brasilia"),
    ("Uruguay", "Montevideo"), ("Paraguay", "Asuncion"), ("Bolivia", "Sucre"),
    ("Ecuador", "Quito"), ("Panama", "Panama City"), ("Costa Rica", "San Jose"),
    ("Jamaica", "Kingston"), ("Honduras", "Tegucigalpa"), ("Nicaragua", "Managua"),
    ("Guatemala", "Guatemala City"), ("El Salvador", "San Salvador"), ("Haiti", "Port-au-Prince"),
    ("Cambodia", "Phnom Penh"), ("Laos", "Vientiane"), ("Myanmar", "Naypyidaw"),
    ("Georgia", "Tbilisi"), ("Armenia", "Yerevan"), ("Azerbaijan", "Baku"),
    ("Uzbekistan", "Tashkent"), ("Oman", "Muscat"), ("Yemen", "Sanaa"), ("Kuwait", "Kuwait City"),
]

FOODS = [
    "rice", "pasta", "potatoes", "carrots", "broccoli", "spinach", "eggs", "chicken breast",
    "salmon", "tofu", "mushrooms", "onions", "garlic", "tomatoes", "zucchini", "eggplant",
    "cauliflower", "green beans", "asparagus", "sweet potatoes", "lentils", "chickpeas",
    "quinoa", "oatmeal", "pancakes", "bacon", "shrimp", "steak", "pork chops", "ground beef",
    "corn on the cob", "brussels sprouts", "cabbage", "kale", "beets", "peppers", "cod",
    "tuna steaks", "scallops", "mussels", "lamb chops", "turkey", "duck breast", "sausages",
    "meatballs", "hamburgers", "french fries", "bread dough", "pizza dough", "risotto",
    "polenta", "couscous", "barley", "black beans", "kidney beans", "peas", "artichokes",
    "leeks", "celery", "pumpkin", "butternut squash", "apples", "pears", "bananas",
    "strawberries", "blueberries", "peaches", "plums", "mangoes", "pineapple", "coconut rice",
    "noodles", "dumplings", "spring rolls", "omelettes", "scrambled eggs", "poached eggs",
    "hard-boiled eggs", "french toast", "waffles", "muffins", "cookies", "brownies",
    "chocolate cake", "banana bread", "soup", "chili", "stew", "curry", "stir-fry vegetables",
    "fried rice", "tacos", "burritos", "lasagna", "mac and cheese", "grilled cheese",
    "roast chicken", "pulled pork", "salmon fillets", "trout", "halibut", "crab cakes",
    "fish tacos", "veggie burgers", "hummus", "guacamole", "salsa", "pesto",
]

ANIMALS = [
    "lions", "tigers", "elephants", "giraffes", "zebras", "hippos", "rhinos", "cheetahs",
    "leopards", "gorillas", "chimpanzees", "orangutans", "koalas", "kangaroos", "wombats",
    "platypuses", "penguins", "polar bears", "brown bears", "pandas", "red pandas", "wolves",
    "foxes", "rabbits", "squirrels", "beavers", "otters", "raccoons", "skunks", "hedgehogs",
    "bats", "owls", "eagles", "hawks", "falcons", "parrots", "flamingos", "peacocks",
    "hummingbirds", "crows", "pigeons", "swans", "ducks", "geese", "chickens", "turkeys",
    "cows", "horses", "donkeys", "goats", "sheep", "pigs", "camels", "llamas", "alpacas",
    "deer", "moose", "bison", "dolphins", "whales", "sharks", "octopuses", "squids",
    "jellyfish", "starfish", "crabs", "lobsters", "sea turtles", "seals", "walruses",
    "crocodiles", "alligators", "snakes", "lizards", "chameleons", "iguanas", "frogs",
    "toads", "salamanders", "bees", "ants", "butterflies", "moths", "spiders", "scorpions",
    "snails", "earthworms", "ladybugs", "dragonflies", "grasshoppers", "cats", "dogs",
    "hamsters", "guinea pigs", "goldfish", "mice", "rats", "sloths", "armadillos",
    "anteaters", "meerkats", "hyenas", "jaguars", "lynxes",
]

WORDS = [
    "happy", "brave", "quick", "ancient", "bright", "calm", "clever", "curious", "eager",
    "fragile", "gentle", "honest", "humble", "jolly", "keen", "loyal", "modest", "noble",
    "polite", "proud", "quiet", "rapid", "serene", "shy", "sincere", "stubborn", "tidy",
    "vivid", "wise", "witty", "abundant", "bitter", "candid", "diligent", "elegant",
    "fierce", "frugal", "generous", "graceful", "hostile", "idle", "jovial", "lavish",
    "meek", "nimble", "obscure", "patient", "prudent", "radiant", "reckless", "rigid",
    "robust", "rustic", "scarce", "sturdy", "subtle", "tedious", "tranquil", "vague",
    "vast", "weary", "zealous", "absurd", "agile", "anxious", "arrogant", "bold", "cautious",
    "cheerful", "content", "cruel", "dainty", "dense", "dismal", "dull", "fearless", "fond",
    "gloomy", "grumpy", "hasty", "hollow", "jealous", "lively", "lonely", "massive", "mellow",
    "nervous", "odd", "peaceful", "plain", "precise", "pure", "rare", "restless", "ripe",
    "rough", "sleepy", "smooth", "solemn", "swift", "timid", "vibrant",
]

# Opening exchanges of the out-of-distribution split's multi-turn questions: an unrelated topic
# first, so the rule's question arrives as the second user turn of a real conversation.
OPENERS = [
    ("Can you suggest a name for a small bookshop?", "How about 'The Reading Nook'?"),
    ("What is a quick way to warm up before a run?",
     "Try five minutes of brisk walking followed by some leg swings."),
    ("Give me a word that rhymes with 'cat'.", "'Hat' rhymes with 'cat'."),
    ("How long should I steep green tea?", "About two to three minutes is usually enough."),
]

# Unrelated exchanges that open the *training* split's multi-turn rows (``?multiturn=N``):
# disjoint from OPENERS above, which only the out-of-distribution eval split uses, so a student
# that answers well after an exchange has learned to, not memorised the eval's conversations.
TRAIN_OPENERS = [
    ("What is a good houseplant for a dark room?", "A snake plant copes well with little light."),
    ("How do I remove a coffee stain from a shirt?",
     "Blot it with cold water and a little dish soap, then wash it as usual."),
    ("Suggest a title for a short story about a lighthouse.", "How about 'The Last Keeper'?"),
    ("How many minutes should I rest between sets at the gym?",
     "One to two minutes is typical for most exercises."),
    ("What is a fun game to play on a long car trip?", "Try 'I spy': it needs nothing but eyes."),
    ("Can you recommend a calm color for a bedroom wall?", "Soft blue or sage green both feel calm."),
    ("How should I store fresh herbs?",
     "Wrap them in a damp paper towel and keep them in the fridge."),
    ("Give me a word that means 'very big'.", "'Enormous' means very big."),
]

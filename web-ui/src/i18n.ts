// User-facing text: Russian first, English available.
export type Lang = "ru" | "en";

const ru = {
  welcome: "Добро пожаловать",
  about: "Это коробка сообщества: чат работает здесь, в этой сети, даже без интернета. Никаких внешних серверов.",
  rules: "Правила: уважайте друг друга. Что писать и читать, каждый решает сам.",
  connect: "Принимаю правила и подключаюсь",
  connected: "Вы подключены к сети коробки.",
  createAccount: "Создать аккаунт",
  username: "Имя пользователя (латиница, цифры, . _ -)",
  password: "Пароль (не короче 8 символов)",
  invite: "Код приглашения",
  register: "Создать",
  registering: "Создаём…",
  done: "Готово! Ваш адрес:",
  appsTitle: "Приложения",
  apps: "Установите Element или Element X и укажите сервер:",
  errTaken: "Это имя уже занято.",
  errName: "Имя может содержать только латиницу, цифры и . _ = - / +",
  errWeak: "Пароль слишком короткий: нужно не меньше 8 символов.",
  errToken: "Код приглашения не подходит.",
  errRate: "Слишком много попыток. Подождите немного.",
  errOther: "Не получилось:",
  lang: "English",
};

const en: typeof ru = {
  welcome: "Welcome",
  about: "This is a community box: chat works here, on this network, even without the internet. No outside servers.",
  rules: "Rules: respect each other. What to write and read is each person's own choice.",
  connect: "I accept the rules and connect",
  connected: "You are connected to the box's network.",
  createAccount: "Create an account",
  username: "Username (latin letters, digits, . _ -)",
  password: "Password (at least 8 characters)",
  invite: "Invite code",
  register: "Create",
  registering: "Creating…",
  done: "Done! Your address:",
  appsTitle: "Apps",
  apps: "Install Element or Element X and enter the server:",
  errTaken: "This name is taken.",
  errName: "Names may contain only latin letters, digits and . _ = - / +",
  errWeak: "Password too short: at least 8 characters.",
  errToken: "The invite code does not work.",
  errRate: "Too many attempts. Wait a little.",
  errOther: "That did not work:",
  lang: "Русский",
};

export const texts = { ru, en };
export type Texts = typeof ru;

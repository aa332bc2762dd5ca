import { QuotaPanel } from "./quota-panel";

export default function Home() {
  return (
    <main>
      <h1>Your AI quota</h1>
      <QuotaPanel />
    </main>
  );
}

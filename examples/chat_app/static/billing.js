// The billing page's two forms. Saving a card: the app creates a SetupIntent (billing's
// AccountService.CreateSetupIntent), Stripe.js confirms it with the card the admin typed
// (the number goes to Stripe only), then the app asks billing to keep the card
// (ConfirmPaymentMethod), which checks the SetupIntent with Stripe itself.
"use strict";

(function () {
  const page = document.getElementById("billing");
  if (!page) return;
  const tenantId = page.dataset.tenantId;

  async function post(url, body) {
    const response = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ tenant_id: tenantId, ...body }),
    });
    const answer = await response.json().catch(() => ({}));
    if (!response.ok) {
      const error = answer.error || {};
      throw new Error(error.message || `The app answered ${response.status}.`);
    }
    return answer;
  }

  function say(element, text, kind) {
    element.textContent = text;
    element.className = `form-status ${kind || ""}`;
  }

  const cardForm = document.getElementById("card-form");
  if (cardForm) {
    const status = document.getElementById("card-status");
    const button = cardForm.querySelector("button[type=submit]");
    if (typeof window.Stripe !== "function") {
      say(status, "Stripe.js did not load; the card form is unavailable.", "error");
      button.disabled = true;
    } else {
      const stripe = window.Stripe(cardForm.dataset.publishableKey);
      const card = stripe.elements().create("card");
      card.mount("#card-element");
      cardForm.addEventListener("submit", async (event) => {
        event.preventDefault();
        button.disabled = true;
        say(status, "Saving the card…");
        try {
          const setup = await post(cardForm.dataset.setupUrl, {});
          const result = await stripe.confirmCardSetup(setup.client_secret, {
            payment_method: { card },
          });
          if (result.error) {
            throw new Error(result.error.message || "Stripe did not accept the card.");
          }
          await post(cardForm.dataset.saveUrl, { setup_intent_id: setup.setup_intent_id });
          say(status, "Card saved.", "ok");
          window.location.reload();
        } catch (error) {
          say(status, error.message, "error");
          button.disabled = false;
        }
      });
    }
  }

  const topUpForm = document.getElementById("auto-top-up-form");
  if (topUpForm) {
    const status = document.getElementById("auto-top-up-status");
    topUpForm.addEventListener("submit", async (event) => {
      event.preventDefault();
      const fields = topUpForm.elements;
      say(status, "Saving…");
      try {
        await post(topUpForm.dataset.url, {
          enabled: fields.enabled.checked,
          threshold: fields.threshold.value,
          amount: fields.amount.value,
          monthly_limit: fields.monthly_limit.value,
        });
        window.location.reload();
      } catch (error) {
        say(status, error.message, "error");
      }
    });
  }
})();
